"""The canary's figures from the model servers' own ``/metrics``, without a Prometheus.

Also the interface both figure sources share (:class:`FiguresSource`): this in-process one
(:class:`ScrapeSource`) and PromQL against a Prometheus (``autoglm_operator.promql``).

``parse(text)`` reads one scrape (the Prometheus text format, parsed by ``prometheus_client``'s
parser) into per-revision counters; ``figures(later, earlier, model, revision)`` turns the
difference of two scrapes into the judge's :class:`~autoglm_operator.canary.Figures`, what
``increase(...[window])`` gives in PromQL. Pure except ``scrape``, which fetches one page.

Counted as requests: generations that finished (``autoglm_request_duration_seconds_count``) plus
requests answered with an error (``autoglm_errors_total``); latency is the request-duration
histogram; joules per token the energy counter over generated tokens.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from autoglm_operator.canary import Figures, Histogram

DURATION = "autoglm_request_duration_seconds"
FIRST_TOKEN = "autoglm_time_to_first_token_seconds"
ERRORS = "autoglm_errors"
TOKENS = "autoglm_tokens"
ENERGY = "autoglm_energy_joules"
FEEDBACK = "autoglm_feedback_score"


class MetricsUnavailableError(Exception):
    """The server's /metrics could not be read; the analysis is Inconclusive, not Failed."""


@dataclass
class Counters:
    """One revision's cumulative counters in one scrape (summed over variants and targets)."""

    finished: float = 0.0
    errors: float = 0.0
    #: Cumulative bucket counts by upper bound in seconds (+Inf included).
    buckets: dict[float, float] = field(default_factory=dict)
    #: The same for the time to first token.
    first_token: dict[float, float] = field(default_factory=dict)
    tokens_out: float = 0.0
    joules: float = 0.0
    #: Feedback scores observed (POST /v1/feedback) and their sum.
    feedback_count: float = 0.0
    feedback_sum: float = 0.0


Scrape = dict[tuple[str, str], Counters]  # (model, revision) -> counters


def parse(text: str) -> Scrape:
    """Per (model, revision) counters of one ``/metrics`` page."""
    out: Scrape = defaultdict(Counters)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            key = (labels.get("model", ""), labels.get("revision", ""))
            if not key[1]:
                continue
            counters = out[key]
            if sample.name == f"{DURATION}_count":
                counters.finished += sample.value
            elif sample.name == f"{DURATION}_bucket":
                bound = float(labels["le"])
                counters.buckets[bound] = counters.buckets.get(bound, 0.0) + sample.value
            elif sample.name == f"{FIRST_TOKEN}_bucket":
                bound = float(labels["le"])
                counters.first_token[bound] = counters.first_token.get(bound, 0.0) + sample.value
            elif sample.name == f"{ERRORS}_total":
                counters.errors += sample.value
            elif sample.name == f"{TOKENS}_total" and labels.get("direction") == "out":
                counters.tokens_out += sample.value
            elif sample.name == f"{ENERGY}_total":
                counters.joules += sample.value
            elif sample.name == f"{FEEDBACK}_count":
                counters.feedback_count += sample.value
            elif sample.name == f"{FEEDBACK}_sum":
                counters.feedback_sum += sample.value
    return dict(out)


def figures(later: Scrape, earlier: Scrape | None, model: str, revision: str) -> Figures | None:
    """What ``revision`` of ``model`` served between two scrapes (all of ``later`` when ``earlier``
    is None); None when the later scrape does not know the revision."""
    now = later.get((model, revision))
    if now is None:
        return None
    before = (earlier or {}).get((model, revision), Counters())
    finished = max(now.finished - before.finished, 0.0)
    errors = max(now.errors - before.errors, 0.0)
    latency = _histogram(now.buckets, before.buckets)
    tokens = now.tokens_out - before.tokens_out
    joules = now.joules - before.joules
    rated = now.feedback_count - before.feedback_count
    return Figures(
        requests=round(finished + errors),
        errors=round(errors),
        latency=latency,
        joules_per_token=joules / tokens if tokens > 0 else None,
        time_to_first_token=_histogram(now.first_token, before.first_token),
        feedback_score=(now.feedback_sum - before.feedback_sum) / rated if rated > 0 else None,
    )


def _histogram(now: dict[float, float], before: dict[float, float]) -> Histogram | None:
    """The histogram (ms) of what was observed between two scrapes of cumulative buckets (s)."""
    if not now:
        return None
    bounds = sorted(now)
    cumulative = [max(now[b] - before.get(b, 0.0), 0.0) for b in bounds]
    return Histogram.from_cumulative([b * 1000 for b in bounds], cumulative)


def scrape(url: str, *, timeout: float = 5.0) -> Scrape:
    """Fetch and parse ``url`` (a server's ``/metrics``); MetricsUnavailableError when it cannot."""
    try:
        response = httpx.get(url, timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise MetricsUnavailableError(f"{url}: {exc}") from exc
    try:
        return parse(response.text)
    except ValueError as exc:
        raise MetricsUnavailableError(f"{url}: not the Prometheus text format: {exc}") from exc


class FiguresSource(Protocol):
    """Where a canary's figures come from: a window is begun at a step's start, then read as often as
    the analysis asks. Both raise :class:`MetricsUnavailableError` when the source cannot answer."""

    #: Shown in the ledger's evidence: how the figures were measured.
    description: str

    def begin(self, now: datetime) -> None:
        """Start a new window at ``now`` (everything before it is left out)."""

    def read(self, model: str, revisions: Sequence[str], now: datetime) -> dict[str, Figures | None]:
        """Each revision's figures from the window's start to ``now`` (None: nothing known of it)."""


class ScrapeSource:
    """Figures from one server's ``/metrics``: the difference between the scrape at the window's
    start and the scrape now, from the same page for every revision (the same traffic)."""

    def __init__(self, metrics_url: str, *, timeout: float = 5.0) -> None:
        self.url, self.timeout = metrics_url, timeout
        self.description = f"in-process scrape of {metrics_url}"
        self._since: Scrape | None = None

    def begin(self, now: datetime) -> None:
        self._since = scrape(self.url, timeout=self.timeout)

    def read(self, model: str, revisions: Sequence[str], now: datetime) -> dict[str, Figures | None]:
        current = scrape(self.url, timeout=self.timeout)
        return {r: figures(current, self._since, model, r) for r in revisions}
