"""Canary analysis: one interval's verdict on a candidate revision, judged on the same traffic as stable.

Pure: figures in, verdict out; no I/O, no clock. The figures come from PromQL or from the servers'
own ``/metrics`` (a later part of the closed-loop issue); this module only judges them, as Argo
Rollouts' AnalysisRun does, with three outcomes:

- **Failed**: an absolute limit of ``spec.rollout.analysis`` is crossed (error rate, p95 latency,
  joules per token, mean feedback score), **or** the candidate is significantly worse than stable
  on the same traffic, the idea of Kayenta's candidate-vs-baseline judgement, which Argo Rollouts
  and Flagger lack: a one-sided Mann-Whitney rank test on the two latency histograms (grouped
  data: the buckets are ties) and a one-sided two-proportion z-test on the error counts, each with
  a smallest effect worth failing for, so a huge sample does not fail a 1% difference.
- **Inconclusive**: no figures (the metrics source is down, a query returned nothing), a NaN, or
  fewer than ``minRequests`` requests, the candidate's or (below 100%) stable's. The caller holds
  the weight: never promote on missing data.
- **Successful** otherwise. A metric nobody feeds (no feedback yet) is *not measured*: neither a
  pass nor a failure.

The two tests are written here (about 30 lines with numpy) rather than taken from scipy, which is
not a runtime dependency; the tests check them against ``scipy.stats``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np

from autoglm_api.spec import Analysis

Outcome = Literal["Successful", "Failed", "Inconclusive"]
SUCCESSFUL: Final = "Successful"
FAILED: Final = "Failed"
INCONCLUSIVE: Final = "Inconclusive"

#: Significance of each candidate-vs-stable test (one-sided) over a whole canary step, however many
#: times it is looked at: the k-th judgement of a step's growing window tests at
#: ``ALPHA / (k * (k + 1))`` (:func:`look_alpha`), and these sum to ALPHA, so a candidate no worse
#: than stable fails any look of a step with probability at most ALPHA per check (a union bound),
#: instead of a chance that grows with every look (bench/canary.py measures both).
ALPHA: Final = 0.05
#: Smallest latency regression worth failing for: candidate median at least 10% above stable's.
MIN_LATENCY_RATIO: Final = 1.10
#: Smallest error-rate increase worth failing for, in absolute terms (2 points).
MIN_ERROR_INCREASE: Final = 0.02


@dataclass(frozen=True)
class Histogram:
    """A latency histogram as Prometheus keeps it: bucket upper bounds (ms, increasing, the last may
    be +Inf) and the count in each bucket (not cumulative)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.bounds) != len(self.counts) or not self.bounds:
            raise ValueError(f"{len(self.bounds)} bucket bounds for {len(self.counts)} counts")
        if any(b >= a for a, b in zip(self.bounds[1:], self.bounds, strict=False)):
            raise ValueError(f"bucket bounds must increase, got {list(self.bounds)}")
        if any(c < 0 for c in self.counts):
            raise ValueError(f"bucket counts must not be negative, got {list(self.counts)}")

    @classmethod
    def from_cumulative(cls, bounds: Sequence[float], cumulative: Sequence[float]) -> Histogram:
        """From Prometheus' cumulative ``le`` buckets (``_bucket`` series)."""
        counts = np.diff(np.asarray(cumulative, dtype=float), prepend=0.0)
        if np.any(counts < 0):
            raise ValueError(f"cumulative bucket counts must not decrease, got {list(cumulative)}")
        return cls(tuple(float(b) for b in bounds), tuple(round(float(c)) for c in counts))

    @classmethod
    def of(cls, samples: Sequence[float], bounds: Sequence[float]) -> Histogram:
        """The histogram a server would have recorded for ``samples`` (tests, benchmarks)."""
        edges = np.asarray(bounds, dtype=float)
        index = np.searchsorted(edges, np.asarray(samples, dtype=float), side="left")
        counts = np.bincount(index, minlength=len(edges))[: len(edges)]
        return cls(tuple(float(b) for b in bounds), tuple(int(c) for c in counts))

    @property
    def total(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float:
        """``histogram_quantile(q, ...)`` as Prometheus computes it: linear within the bucket that
        holds rank ``q * total``; the highest finite bound when that is the +Inf bucket."""
        total = self.total
        if total == 0:
            return math.nan
        rank = q * total
        seen = 0.0
        for i, (upper, count) in enumerate(zip(self.bounds, self.counts, strict=True)):
            if seen + count >= rank and count > 0:
                if math.isinf(upper):
                    return self.bounds[i - 1] if i > 0 else math.nan
                lower = self.bounds[i - 1] if i > 0 else 0.0
                return lower + (upper - lower) * (rank - seen) / count
            seen += count
        return self.bounds[-2] if math.isinf(self.bounds[-1]) and len(self.bounds) > 1 else self.bounds[-1]


@dataclass(frozen=True)
class Figures:
    """One revision's figures over one analysis interval."""

    requests: int
    errors: int
    latency: Histogram | None = None
    joules_per_token: float | None = None
    #: Mean feedback score in [0, 1]; None when nobody sent feedback (not measured).
    feedback_score: float | None = None
    #: Time to first token (arrival to the first generated token), reported beside latency.
    time_to_first_token: Histogram | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else math.nan

    def __add__(self, other: Figures) -> Figures:
        """Two intervals' figures together (requests, errors, buckets summed; the other figures
        request-weighted): a canary step judged on everything since it began."""
        return Figures(
            requests=self.requests + other.requests,
            errors=self.errors + other.errors,
            latency=_summed(self.latency, other.latency),
            joules_per_token=_weighted(
                self.joules_per_token, self.requests, other.joules_per_token, other.requests
            ),
            feedback_score=_weighted(
                self.feedback_score, self.requests, other.feedback_score, other.requests
            ),
            time_to_first_token=_summed(self.time_to_first_token, other.time_to_first_token),
        )


def _summed(a: Histogram | None, b: Histogram | None) -> Histogram | None:
    if a is None or b is None:
        return a or b
    if a.bounds != b.bounds:
        raise ValueError("the two histograms must have the same buckets")
    return Histogram(a.bounds, tuple(x + y for x, y in zip(a.counts, b.counts, strict=True)))


def _weighted(a: float | None, na: int, b: float | None, nb: int) -> float | None:
    if a is None or b is None:
        return a if b is None else b
    return (a * na + b * nb) / (na + nb) if na + nb else math.nan


@dataclass(frozen=True)
class Check:
    """One judged figure: what was measured, against what, and the verdict (None: not measured)."""

    metric: str
    value: float | None
    threshold: float | None
    passed: bool | None
    detail: str = ""
    statistics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "value": _finite(self.value),
            "threshold": self.threshold,
            "passed": self.passed,
            "detail": self.detail,
            "statistics": {k: _finite(v) for k, v in self.statistics.items()},
        }


@dataclass(frozen=True)
class AnalysisResult:
    outcome: Outcome
    reason: str
    checks: tuple[Check, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The ledger evidence: every check with its value, threshold and test statistics."""
        return {"outcome": self.outcome, "reason": self.reason, "checks": [c.to_json() for c in self.checks]}


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def _upper_tail(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def rank_test(candidate: Histogram, stable: Histogram) -> tuple[float, float]:
    """One-sided Mann-Whitney U test that the candidate's latencies are larger than stable's, on
    grouped data (each bucket is a run of ties): normal approximation with tie correction and
    continuity correction. Returns (z, p)."""
    if candidate.bounds != stable.bounds:
        raise ValueError("the two histograms must have the same buckets")
    a = np.asarray(candidate.counts, dtype=float)
    b = np.asarray(stable.counts, dtype=float)
    n1, n2 = a.sum(), b.sum()
    if n1 == 0 or n2 == 0:
        return math.nan, math.nan
    below = np.concatenate(([0.0], np.cumsum(b)[:-1]))  # stable values in lower buckets
    u = float(np.sum(a * (below + b / 2)))  # candidate beats stable: ties count half
    n = n1 + n2
    ties = a + b
    variance = n1 * n2 / 12 * ((n + 1) - float(np.sum(ties**3 - ties)) / (n * (n - 1)))
    if variance <= 0:
        return 0.0, 1.0
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return z, _upper_tail(z)


def proportions_test(errors_a: int, n_a: int, errors_b: int, n_b: int) -> tuple[float, float]:
    """One-sided two-proportion z-test that A's error rate is higher than B's. Returns (z, p)."""
    if n_a == 0 or n_b == 0:
        return math.nan, math.nan
    pooled = (errors_a + errors_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 0.0, 1.0
    z = (errors_a / n_a - errors_b / n_b) / se
    return z, _upper_tail(z)


#: The checks that test the candidate against stable (those that spend significance).
ERROR_RATE_VS_STABLE: Final = "errorRateVsStable"
LATENCY_VS_STABLE: Final = "latencyVsStable"
RELATIVE_METRICS: Final = frozenset({ERROR_RATE_VS_STABLE, LATENCY_VS_STABLE})


def look_alpha(look: int) -> float:
    """The significance of the ``look``-th judgement (1, 2, ...) of one window: ALPHA/2, ALPHA/6,
    ALPHA/12, ... (they sum to ALPHA). A real regression's p-value falls much faster than this as
    the window grows (a 2x slower candidate: p below 1e-6 within a few dozen requests)."""
    if look < 1:
        raise ValueError(f"looks are counted from 1, got {look}")
    return ALPHA / (look * (look + 1))


def judge(
    candidate: Figures | None,
    stable: Figures | None,
    limits: Analysis,
    *,
    weight: int = 100,
    look: int = 1,
) -> AnalysisResult:
    """The outcome of one analysis interval for ``candidate`` (``stable``: the same interval's figures
    of the serving revision, or None on a first rollout with nothing to compare with). ``weight``:
    the candidate's share of traffic; below 100 stable gets the rest, and a stable that served fewer
    than ``minRequests`` is missing data (holding), not a reason to judge on absolute limits alone.
    ``look``: which test of the candidate against stable over the same growing window this is (the
    relative tests' significance, :func:`look_alpha`)."""
    if candidate is None:
        return AnalysisResult(
            INCONCLUSIVE, "no figures for the candidate: the metrics source is down or empty"
        )
    numbers = [candidate.joules_per_token, candidate.feedback_score]
    if any(v is not None and not math.isfinite(v) for v in numbers) or candidate.requests < 0:
        return AnalysisResult(INCONCLUSIVE, "a query returned NaN or a negative count: holding")
    if candidate.requests < limits.min_requests:
        return AnalysisResult(
            INCONCLUSIVE,
            f"{candidate.requests} requests, fewer than minRequests {limits.min_requests}: holding",
        )
    comparable = stable is not None and stable.requests >= limits.min_requests
    checks = list(_absolute_checks(candidate, limits))
    if comparable:
        assert stable is not None
        checks.extend(_relative_checks(candidate, stable, look_alpha(look)))
    failed = [c for c in checks if c.passed is False]
    if failed:
        return AnalysisResult(FAILED, "; ".join(f"{c.metric}: {c.detail}" for c in failed), tuple(checks))
    if stable is not None and not comparable and weight < 100:  # the comparison's other half is missing
        return AnalysisResult(
            INCONCLUSIVE,
            f"stable served {stable.requests} requests at {100 - weight}% of traffic, fewer than minRequests "
            f"{limits.min_requests}: holding",
            tuple(checks),
        )
    if any(c.passed is None and c.metric == "p95LatencyMs" for c in checks):
        return AnalysisResult(INCONCLUSIVE, "no latency histogram for the candidate: holding", tuple(checks))
    if comparable:
        against = "against stable"
    elif stable is None:
        against = "on absolute limits (no stable to compare with)"
    else:  # at 100% stable gets no traffic
        against = f"on absolute limits (stable served {stable.requests}, fewer than minRequests)"
    return AnalysisResult(SUCCESSFUL, f"every check passed {against}", tuple(checks))


def _absolute_checks(c: Figures, limits: Analysis) -> list[Check]:
    checks = [
        _limit("errorRate", c.error_rate, limits.max_error_rate, above_fails=True),
        _limit(
            "p95LatencyMs", c.latency.quantile(0.95) if c.latency else None, limits.max_p95_latency_ms, True
        ),
        _limit("joulesPerToken", c.joules_per_token, limits.max_joules_per_token, above_fails=True),
        _limit("feedbackScore", c.feedback_score, limits.min_feedback_score, above_fails=False),
    ]
    return checks


def _limit(metric: str, value: float | None, threshold: float, above_fails: bool) -> Check:
    if value is None or not math.isfinite(value):
        return Check(metric, value, threshold, None, "not measured")
    passed = value <= threshold if above_fails else value >= threshold
    sign = "<=" if above_fails else ">="
    return Check(metric, value, threshold, passed, f"{value:.4g} (must be {sign} {threshold:.4g})")


def _relative_checks(c: Figures, s: Figures, alpha: float) -> list[Check]:
    checks = []
    z, p = proportions_test(c.errors, c.requests, s.errors, s.requests)
    increase = c.error_rate - s.error_rate
    worse = p < alpha and increase >= MIN_ERROR_INCREASE
    checks.append(
        Check(
            ERROR_RATE_VS_STABLE,
            c.error_rate,
            s.error_rate,
            not worse,
            f"{c.error_rate:.3f} against stable's {s.error_rate:.3f} (p={p:.2g})",
            {"z": z, "p": p, "alpha": alpha, "increase": increase},
        )
    )
    if c.latency is not None and s.latency is not None and c.latency.total and s.latency.total:
        z, p = rank_test(c.latency, s.latency)
        ratio = c.latency.quantile(0.5) / max(s.latency.quantile(0.5), 1e-9)
        worse = p < alpha and ratio >= MIN_LATENCY_RATIO
        checks.append(
            Check(
                LATENCY_VS_STABLE,
                c.latency.quantile(0.5),
                s.latency.quantile(0.5),
                not worse,
                f"median {ratio:.2f}x stable's (Mann-Whitney p={p:.2g})",
                {"z": z, "p": p, "alpha": alpha, "medianRatio": ratio},
            )
        )
    return checks
