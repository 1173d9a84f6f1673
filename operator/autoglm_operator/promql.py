"""The canary's figures as PromQL against a Prometheus HTTP API (``autoglm run --prometheus-url``).

The same figures as the in-process scrape (``autoglm_operator.metrics``), asked of a Prometheus that
scrapes the model servers: for a window from the step's start to now, per revision of the model,

- requests: ``sum(increase(autoglm_request_duration_seconds_count{...}[W]))`` plus the errors,
- errors: ``sum(increase(autoglm_errors_total{...}[W]))``,
- latency: ``sum by (le) (increase(autoglm_request_duration_seconds_bucket{...}[W]))``, and the
  same of ``autoglm_time_to_first_token_seconds_bucket`` for the time to first token,
- feedback score: the increase of ``autoglm_feedback_score_sum`` over that of its ``_count``,
- joules per token: the increase of ``autoglm_energy_joules_total`` over that of the generated
  ``autoglm_tokens_total{direction="out"}``,

each an instant query at ``now`` (``GET /api/v1/query``), summed over every server, variant and target
that serves the revision. ``increase`` handles a server restart (a counter reset) and extrapolates
to the window's edges, so its counts can be fractional: they are rounded.

A revision whose series are not current at ``now`` (never served, or stale because the server's
``/metrics`` stopped answering and Prometheus marked it so) has no figures: the judge says
Inconclusive and the weight holds, never a verdict on old samples. A Prometheus that does not
answer raises :class:`~autoglm_operator.metrics.MetricsUnavailableError`, as a server would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import httpx
import numpy as np

from autoglm_operator.canary import Figures, Histogram
from autoglm_operator.metrics import (
    DURATION,
    ENERGY,
    ERRORS,
    FEEDBACK,
    FIRST_TOKEN,
    TOKENS,
    MetricsUnavailableError,
)


def _quote(value: str) -> str:
    """A PromQL string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class PrometheusSource:
    """Figures from ``url``'s ``/api/v1/query``; ``selector``: more label matchers (e.g. a job)."""

    def __init__(self, url: str, *, selector: str = "", timeout: float = 10.0) -> None:
        self.url, self.selector, self.timeout = url.rstrip("/"), selector.strip(", "), timeout
        self.description = f"PromQL against {self.url}"
        self._since: datetime | None = None
        #: The queries of the newest read, for the ledger's evidence.
        self.queries: list[str] = []

    def begin(self, now: datetime) -> None:
        self._since = now

    def query(self, promql: str, at: datetime) -> list[dict[str, Any]]:
        """An instant query's result vector; MetricsUnavailableError when Prometheus cannot answer."""
        try:
            r = httpx.get(
                f"{self.url}/api/v1/query", params={"query": promql, "time": f"{at.timestamp():.3f}"},
                timeout=self.timeout,
            )  # fmt: skip
        except httpx.HTTPError as exc:
            raise MetricsUnavailableError(f"Prometheus at {self.url}: {exc}") from exc
        try:
            body = r.json()
        except ValueError as exc:
            raise MetricsUnavailableError(f"Prometheus at {self.url}: {r.status_code}, not JSON") from exc
        if r.status_code >= 400 or body.get("status") != "success":
            raise MetricsUnavailableError(
                f"Prometheus at {self.url}: {body.get('errorType', r.status_code)}: {body.get('error', '')}"
                f" (query {promql})"
            )
        data = body.get("data") or {}
        if data.get("resultType") != "vector":
            raise MetricsUnavailableError(f"{promql}: a {data.get('resultType')}, not an instant vector")
        result: list[dict[str, Any]] = data.get("result") or []
        return result

    def read(self, model: str, revisions: Sequence[str], now: datetime) -> dict[str, Figures | None]:
        if self._since is None:
            raise RuntimeError("begin() a window before reading it")
        window = f"{max(round((now - self._since).total_seconds() * 1000), 1)}ms"
        wanted = [r for r in revisions if r]
        matcher = f"model={_quote(model)},revision=~{_quote('|'.join(_regex(r) for r in wanted))}"
        if self.selector:
            matcher += f",{self.selector}"

        def by_revision(promql: str, *extra: str) -> dict[tuple[str, ...], float]:
            labels = ("revision", *extra)
            self.queries.append(promql)
            out: dict[tuple[str, ...], float] = {}
            for sample in self.query(promql, now):
                key = tuple(sample["metric"].get(label, "") for label in labels)
                out[key] = float(sample["value"][1])
            return out

        self.queries = []
        current = by_revision(f"count by (revision) ({DURATION}_count{{{matcher}}})")
        finished = by_revision(f"sum by (revision) (increase({DURATION}_count{{{matcher}}}[{window}]))")
        errors = by_revision(f"sum by (revision) (increase({ERRORS}_total{{{matcher}}}[{window}]))")
        buckets = by_revision(
            f"sum by (revision, le) (increase({DURATION}_bucket{{{matcher}}}[{window}]))", "le"
        )
        first = by_revision(
            f"sum by (revision, le) (increase({FIRST_TOKEN}_bucket{{{matcher}}}[{window}]))", "le"
        )
        tokens = by_revision(
            f'sum by (revision) (increase({TOKENS}_total{{{matcher},direction="out"}}[{window}]))'
        )
        joules = by_revision(f"sum by (revision) (increase({ENERGY}_total{{{matcher}}}[{window}]))")
        rated = by_revision(f"sum by (revision) (increase({FEEDBACK}_count{{{matcher}}}[{window}]))")
        score_sum = by_revision(f"sum by (revision) (increase({FEEDBACK}_sum{{{matcher}}}[{window}]))")
        out: dict[str, Figures | None] = {}
        for revision in wanted:
            key = (revision,)
            if key not in current:  # never served, or stale: the server's metrics are not current
                out[revision] = None
                continue
            n_finished, n_errors = finished.get(key, 0.0), errors.get(key, 0.0)
            if math.isnan(n_finished) or math.isnan(n_errors):
                out[revision] = None
                continue
            latency, ttft = _histogram(buckets, revision), _histogram(first, revision)
            out_tokens, spent = tokens.get(key, 0.0), joules.get(key)
            out[revision] = Figures(
                requests=round(n_finished + n_errors),
                errors=round(n_errors),
                latency=latency,
                joules_per_token=spent / out_tokens if spent is not None and out_tokens > 0 else None,
                time_to_first_token=ttft,
                feedback_score=score_sum.get(key, 0.0) / n_rated
                if (n_rated := rated.get(key, 0.0)) > 0
                else None,
            )
        return out


def _histogram(buckets: dict[tuple[str, ...], float], revision: str) -> Histogram | None:
    """A revision's histogram (ms) from ``sum by (revision, le)`` of bucket increases (s)."""
    by_le = {float(le): v for (r, le), v in buckets.items() if r == revision}
    if not by_le:
        return None
    bounds = sorted(by_le)
    cumulative = np.maximum.accumulate(np.nan_to_num([by_le[b] for b in bounds]))
    return Histogram.from_cumulative([b * 1000 for b in bounds], np.round(cumulative).tolist())


def _regex(value: str) -> str:
    """``value`` matched literally inside a PromQL (RE2) regular expression."""
    return "".join("\\" + c if c in r"\.+*?()|[]{}^$" else c for c in value)
