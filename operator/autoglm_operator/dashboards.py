"""The fleet's dashboards as data: every panel's title, unit, what it shows and its queries (PromQL
on the servers' metrics, SQL on the audit ledger). One source for the Grafana dashboards that
``make dashboards`` writes into the chart (``tools/dashboards.py``, with Grafana's own
grafana-foundation-sdk) and for ``autoglm fleet snapshot``, which draws the key panels to PNG for
people without Grafana. Pure: no I/O.

Grafana's variables are written as Grafana writes them (``$model``, ``$__rate_interval``,
``$__timeFrom()``); :func:`expand` fills them in for a plain Prometheus or PostgreSQL.

Series labels: the servers label every series with ``model``, ``revision``, ``prompt_variant`` and
``target`` (the AutoGLMModel's target); the chart's PodMonitor adds ``pool`` (the pod's
``autoglm.io/pool``: cloud-gpu, cpu, kubeedge). ``autoglm_revision_traffic`` says which revision
is a model's canary (``role``), and energy series carry the ``method`` that measured them (rapl, nvml
or cpu-time-model), shown on every energy panel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

#: Grafana's variables and what each is when every value is wanted.
VARIABLES = {"model": ".*", "target": ".*", "pool": ".*"}
#: The label matchers every server series is filtered by.
SELECT = 'model=~"$model", target=~"$target", pool=~"$pool"'
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    expr: str
    #: Grafana's legend format (``{{label}}``); for SQL, unused.
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    kind: Literal["timeseries", "table", "stat"] = "timeseries"
    #: Drawn by ``autoglm fleet snapshot``.
    key: bool = False
    #: The panel's width in Grafana's 24-column grid.
    width: int = 12


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    datasource: Literal["prometheus", "postgres"]
    panels: tuple[Panel, ...] = field(default_factory=tuple)

    @property
    def file(self) -> str:
        return f"{self.uid.removeprefix('autoglm-')}.json"


def _quantile(q: float, metric: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{SELECT}}}[{RATE}])))"


def _role_quantile(q: float, metric: str) -> str:
    """A quantile by role (stable, canary): each revision's buckets joined to its role."""
    role = "group_left(role) (0 * autoglm_revision_traffic + 1)"
    return (
        f"histogram_quantile({q}, sum by (le, model, role) (rate({metric}_bucket{{{SELECT}}}[{RATE}]) "
        f"* on (instance, model, revision) {role}))"
    )


_REQUESTS = f"rate(autoglm_request_duration_seconds_count{{{SELECT}}}[{RATE}])"
_ERRORS = f"rate(autoglm_errors_total{{{SELECT}}}[{RATE}])"
#: A server that never failed has no error series: 0 there, not "no data".
_ERRORS_OR_ZERO = f"(sum by (model, target) ({_ERRORS}) or 0 * sum by (model, target) ({_REQUESTS}))"
_JOULES = f"rate(autoglm_energy_joules_total{{{SELECT}}}[{RATE}])"
_TOKENS_OUT = f'rate(autoglm_tokens_total{{{SELECT}, direction="out"}}[{RATE}])'
_VALIDATED = "autoglm_revision_validated_energy_per_token_joules"

FLEET_LATENCY = Dashboard(
    uid="autoglm-fleet-latency",
    title="AutoGLM / Fleet latency",
    description="Latency and time to first token of every served model, per revision, target and pool; "
    "cloud against edge; canary against stable; errors, batching and queueing.",
    datasource="prometheus",
    panels=(
        Panel(
            "Request latency p50 / p95 / p99",
            "Arrival to last byte, per model, target and pool.",
            "s",
            tuple(
                Query(
                    _quantile(q, "autoglm_request_duration_seconds", "model, target, pool"),
                    f"p{round(q * 100)} {{{{model}}}} {{{{target}}}} ({{{{pool}}}})",
                )
                for q in (0.5, 0.95, 0.99)
            ),
            key=True,
        ),
        Panel(
            "Time to first token p50 / p95",
            "Arrival to the first generated token (streamed requests feel this one).",
            "s",
            tuple(
                Query(
                    _quantile(q, "autoglm_time_to_first_token_seconds", "model, target, pool"),
                    f"p{round(q * 100)} {{{{model}}}} {{{{target}}}} ({{{{pool}}}})",
                )
                for q in (0.5, 0.95)
            ),
            key=True,
        ),
        Panel(
            "Latency p95 by revision",
            "Each served revision of each model: a new revision's latency beside the one it replaces.",
            "s",
            (
                Query(
                    _quantile(0.95, "autoglm_request_duration_seconds", "model, revision"),
                    "{{model}} {{revision}}",
                ),
            ),
        ),
        Panel(
            "Cloud against edge: latency p95 by pool",
            "The same models on cloud GPU pools and on KubeEdge nodes.",
            "s",
            (Query(_quantile(0.95, "autoglm_request_duration_seconds", "pool"), "{{pool}}"),),
            key=True,
        ),
        Panel(
            "Canary against stable: latency p95",
            "While a canary runs, its latency beside stable's (what the canary analysis judges).",
            "s",
            (Query(_role_quantile(0.95, "autoglm_request_duration_seconds"), "{{model}} {{role}}"),),
            key=True,
        ),
        Panel(
            "Canary weight",
            "Each served revision's share of its model's traffic, by role.",
            "percentunit",
            (
                Query(
                    f"avg by (model, revision, role) (autoglm_revision_traffic{{{SELECT}}})",
                    "{{model}} {{revision}} ({{role}})",
                ),
            ),
        ),
        Panel(
            "Error rate",
            "Requests answered with an error over all requests, per model and target.",
            "percentunit",
            (
                Query(
                    f"{_ERRORS_OR_ZERO} / (sum by (model, target) ({_REQUESTS}) + {_ERRORS_OR_ZERO})",
                    "{{model}} {{target}}",
                ),
            ),
            key=True,
        ),
        Panel(
            "Requests per second",
            "Finished generations per second, per model, revision and target.",
            "reqps",
            (Query(f"sum by (model, revision, target) ({_REQUESTS})", "{{model}} {{revision}} {{target}}"),),
        ),
        Panel(
            "Batch size",
            "Requests decoded together per decode step: mean and p95 (continuous batching at work).",
            "short",
            (
                Query(
                    f"sum by (model, target) (rate(autoglm_batch_size_sum{{{SELECT}}}[{RATE}])) / "
                    f"sum by (model, target) (rate(autoglm_batch_size_count{{{SELECT}}}[{RATE}]))",
                    "mean {{model}} {{target}}",
                ),
                Query(_quantile(0.95, "autoglm_batch_size", "model, target"), "p95 {{model}} {{target}}"),
            ),
        ),
        Panel(
            "Queue depth",
            "Requests waiting for a batch slot, per model and target.",
            "short",
            (Query(f"sum by (model, target) (autoglm_queue_depth{{{SELECT}}})", "{{model}} {{target}}"),),
        ),
    ),
)

FLEET_ENERGY = Dashboard(
    uid="autoglm-fleet-energy",
    title="AutoGLM / Fleet energy",
    description="Watts and joules per token of every pool and revision, and the energy compression saved "
    "against each revision's source model. Every series names its method: rapl (CPU package counters), "
    "nvml (GPU counters) or cpu-time-model (CPU time times a per-core wattage: modelled, not measured).",
    datasource="prometheus",
    panels=(
        Panel(
            "Power by pool and revision",
            "Joules per second of generation (watts), by pool, revision and measurement method.",
            "watt",
            (Query(f"sum by (pool, revision, method) ({_JOULES})", "{{pool}} {{revision}} ({{method}})"),),
            key=True,
        ),
        Panel(
            "Joules per generated token",
            "Energy over generated tokens, by pool, revision and measurement method.",
            "J",
            (
                Query(
                    f"sum by (pool, revision, method) ({_JOULES}) / on (pool, revision) group_left "
                    f"sum by (pool, revision) ({_TOKENS_OUT})",
                    "{{pool}} {{revision}} ({{method}})",
                ),
            ),
            key=True,
        ),
        Panel(
            "Energy saved by compression",
            "1 - joules per token of each served revision over its source model's, both as validate measured "
            "them on the same machine (the model card's validation; method in the legend).",
            "percentunit",
            (
                Query(
                    f'1 - avg by (model, revision, method) ({_VALIDATED}{{of="candidate", model=~"$model"}}) / '
                    f'avg by (model, revision, method) ({_VALIDATED}{{of="source", model=~"$model"}})',
                    "{{model}} {{revision}} ({{method}})",
                ),
            ),
            key=True,
        ),
        Panel(
            "Energy per hour by pool",
            "Kilojoules used per hour of generation, by pool and method.",
            "kJ",
            (
                Query(
                    f"sum by (pool, method) (increase(autoglm_energy_joules_total{{{SELECT}}}[1h])) / 1000",
                    "{{pool}} ({{method}})",
                ),
            ),
        ),
        Panel(
            "Tokens per second by pool",
            "Generated tokens per second: what the energy above bought.",
            "short",
            (Query(f"sum by (pool, revision) ({_TOKENS_OUT})", "{{pool}} {{revision}}"),),
        ),
    ),
)

#: ``${model:raw}``: Grafana quotes a variable in SQL unless told not to; ``.*`` when all are wanted.
_IN_RANGE = "CAST(time AS timestamptz) BETWEEN $__timeFrom() AND $__timeTo() AND model ~ '^(${model:raw})$'"

DECISIONS = Dashboard(
    uid="autoglm-decisions",
    title="AutoGLM / Decisions",
    description="Every autonomous decision from the audit ledger (PostgreSQL): what was decided, on which "
    "revision, by whom, and why.",
    datasource="postgres",
    panels=(
        Panel(
            "Decisions",
            "The newest decisions first; the evidence of each is in the ledger (autoglm audit show ID).",
            "none",
            (
                Query(
                    'SELECT CAST(time AS timestamptz) AS "time", namespace, model, revision, decision, actor, '
                    f"reason, id FROM audit_records WHERE {_IN_RANGE} ORDER BY seq DESC LIMIT 500"
                ),
            ),
            kind="table",
            width=24,
        ),
        Panel(
            "Decisions per hour by kind",
            "How often the loop decides what: rollouts, promotions, rollbacks, gates, policy changes.",
            "short",
            (
                Query(
                    "SELECT date_trunc('hour', CAST(time AS timestamptz)) AS \"time\", decision AS metric, "
                    f"count(*) AS value FROM audit_records WHERE {_IN_RANGE} GROUP BY 1, 2 ORDER BY 1"
                ),
            ),
        ),
        Panel(
            "Rollbacks and failed gates",
            "Revisions the loop refused in the time range.",
            "short",
            (
                Query(
                    "SELECT count(*) AS value FROM audit_records "
                    f"WHERE {_IN_RANGE} AND decision IN ('RolledBack', 'GateFailed')"
                ),
            ),
            kind="stat",
        ),
    ),
)

DASHBOARDS = (FLEET_LATENCY, FLEET_ENERGY, DECISIONS)


def expand(
    text: str,
    *,
    rate_interval: str = "5m",
    time_from: str = "1970-01-01T00:00:00Z",
    time_to: str = "2100-01-01T00:00:00Z",
    **variables: str,
) -> str:
    """A query with Grafana's variables and macros filled in (every model, target and pool unless
    ``variables`` narrows them), for a plain Prometheus or PostgreSQL."""
    values = {**VARIABLES, **variables}
    text = text.replace("$__rate_interval", rate_interval)
    text = text.replace("$__timeFrom()", f"'{time_from}'").replace("$__timeTo()", f"'{time_to}'")
    return re.sub(
        r"\$\{(\w+)(?::\w+)?\}|\$(\w+)",
        lambda m: values.get(m.group(1) or m.group(2), m.group(0)),
        text,
    )
