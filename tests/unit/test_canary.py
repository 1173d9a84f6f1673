"""The canary judge: its tests against scipy's, its outcomes on the cases a rollout meets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from autoglm_api.spec import Analysis
from autoglm_inference.telemetry import LATENCY_BUCKETS
from autoglm_operator.canary import (
    ALPHA,
    Figures,
    Histogram,
    judge,
    look_alpha,
    proportions_test,
    rank_test,
)

BOUNDS = (25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0, math.inf)
LIMITS = Analysis(min_requests=50, max_error_rate=0.05, max_p95_latency_ms=800.0)


def latencies(n: int, median: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(math.log(median), 0.35, n)


def figures(n: int, errors: int, median: float, seed: int, **kw: float | None) -> Figures:
    return Figures(requests=n, errors=errors, latency=Histogram.of(latencies(n, median, seed), BOUNDS), **kw)


@pytest.mark.parametrize("seed", range(5))
def test_the_rank_test_is_scipys_mann_whitney_on_the_bucketed_values(seed: int) -> None:
    a = Histogram.of(latencies(60, 120, seed), BOUNDS)
    b = Histogram.of(latencies(80, 100, seed + 100), BOUNDS)
    _z, p = rank_test(a, b)
    # The same data as scipy sees it: each request's bucket index (ties within a bucket).
    xs = np.repeat(np.arange(len(BOUNDS)), a.counts)
    ys = np.repeat(np.arange(len(BOUNDS)), b.counts)
    want = stats.mannwhitneyu(xs, ys, alternative="greater", method="asymptotic", use_continuity=True)
    assert p == pytest.approx(want.pvalue, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("ea", "na", "eb", "nb"), [(6, 50, 1, 50), (10, 400, 3, 500), (2, 60, 2, 60)])
def test_the_proportions_test_is_the_chi_square_test_one_sided(ea: int, na: int, eb: int, nb: int) -> None:
    z, p = proportions_test(ea, na, eb, nb)
    chi2, p_two, _, _ = stats.chi2_contingency([[ea, na - ea], [eb, nb - eb]], correction=False)
    assert z**2 == pytest.approx(chi2, rel=1e-9)
    assert p == pytest.approx(p_two / 2 if z > 0 else 1 - p_two / 2, rel=1e-9)


def test_quantiles_are_prometheus_histogram_quantile() -> None:
    h = Histogram(bounds=(100.0, 200.0, 400.0, math.inf), counts=(50, 30, 15, 5))
    assert h.quantile(0.5) == pytest.approx(100.0)  # rank 50 ends the first bucket
    assert h.quantile(0.95) == pytest.approx(400.0)  # rank 95: 200 + 200 * 15/15
    assert h.quantile(0.9) == pytest.approx(200 + 200 * 10 / 15)
    assert h.quantile(0.99) == 400.0  # in the +Inf bucket: the highest finite bound
    assert Histogram.from_cumulative(h.bounds, [50, 80, 95, 100]) == h
    assert math.isnan(Histogram(bounds=(1.0,), counts=(0,)).quantile(0.5))
    with pytest.raises(ValueError, match="must increase"):
        Histogram(bounds=(2.0, 1.0), counts=(1, 1))


def test_equal_revisions_pass_and_the_evidence_names_every_check() -> None:
    result = judge(figures(200, 1, 100, 1), figures(200, 1, 100, 2), LIMITS)
    assert result.outcome == "Successful"
    evidence = result.to_json()
    names = [c["metric"] for c in evidence["checks"]]
    assert names == [
        "errorRate",
        "p95LatencyMs",
        "joulesPerToken",
        "feedbackScore",
        "errorRateVsStable",
        "latencyVsStable",
    ]
    feedback = next(c for c in evidence["checks"] if c["metric"] == "feedbackScore")
    assert (feedback["passed"], feedback["detail"]) == (None, "not measured")  # nobody sent feedback yet


def test_a_slower_candidate_fails_on_the_rank_test_below_the_absolute_limit() -> None:
    result = judge(figures(200, 0, 150, 1), figures(200, 0, 100, 2), LIMITS)
    assert result.outcome == "Failed"
    assert "latencyVsStable" in result.reason
    p95 = next(c for c in result.checks if c.metric == "p95LatencyMs")
    assert p95.passed is True  # the absolute limit alone would have promoted it


def test_absolute_limits_fail_on_their_own() -> None:
    assert judge(figures(100, 10, 100, 1), None, LIMITS).outcome == "Failed"  # 10% errors
    assert judge(figures(100, 0, 100, 1, joules_per_token=5.0), None, LIMITS).reason.startswith(
        "joulesPerToken"
    )
    assert judge(figures(100, 0, 100, 1, feedback_score=0.3), None, LIMITS).outcome == "Failed"
    first = judge(figures(100, 0, 100, 1), None, LIMITS)
    assert first.outcome == "Successful"
    assert "no stable to compare with" in first.reason
    at_100 = judge(figures(100, 0, 100, 1), figures(0, 0, 100, 2), LIMITS)  # stable got no traffic
    assert at_100.outcome == "Successful"
    assert "stable served 0, fewer than minRequests" in at_100.reason


def test_below_100_a_stable_with_too_few_requests_holds_instead_of_promoting_on_absolute_limits() -> None:
    """At 50% an unlucky split gave stable 3 requests: a 3x slower candidate was promoted on its
    absolute limits alone (seen in the two-target loop test). Missing data holds."""
    slow, few = figures(100, 0, 300, 1), figures(LIMITS.min_requests - 1, 0, 100, 2)
    held = judge(slow, few, LIMITS, weight=50)
    assert held.outcome == "Inconclusive"
    assert f"stable served {LIMITS.min_requests - 1} requests at 50% of traffic" in held.reason
    assert judge(slow, few, LIMITS, weight=100).outcome == "Successful"  # at 100% stable gets none
    failing = judge(figures(100, 10, 100, 1), few, LIMITS, weight=50)  # an absolute limit still fails
    assert failing.outcome == "Failed"


def test_missing_data_holds_and_never_promotes() -> None:
    assert judge(None, figures(200, 0, 100, 2), LIMITS).outcome == "Inconclusive"
    assert judge(figures(20, 0, 100, 1), figures(200, 0, 100, 2), LIMITS).outcome == "Inconclusive"
    nan = figures(200, 0, 100, 1, joules_per_token=math.nan)
    assert judge(nan, figures(200, 0, 100, 2), LIMITS).outcome == "Inconclusive"
    no_latency = Figures(requests=200, errors=0)
    assert judge(no_latency, None, LIMITS).outcome == "Inconclusive"


@given(
    requests=st.integers(0, 10_000),
    errors=st.integers(0, 10_000),
    median=st.floats(1, 5000),
    joules=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
)
def test_never_successful_without_enough_finite_data(
    requests: int, errors: int, median: float, joules: float | None
) -> None:
    errors = min(errors, requests)
    lat = Histogram.of(latencies(min(requests, 500), median, 0), BOUNDS) if requests else None
    result = judge(Figures(requests, errors, lat, joules_per_token=joules), None, LIMITS)
    if requests < LIMITS.min_requests or (joules is not None and not math.isfinite(joules)):
        assert result.outcome == "Inconclusive"
    assert result.outcome in ("Successful", "Failed", "Inconclusive")


def test_figures_since_the_step_began_are_the_intervals_summed() -> None:
    a = figures(50, 1, 100, 1, joules_per_token=1.0)
    b = figures(150, 3, 100, 2, joules_per_token=2.0, feedback_score=0.8)
    both = a + b
    assert (both.requests, both.errors) == (200, 4)
    assert both.latency is not None
    assert both.latency.total == 200
    assert both.joules_per_token == pytest.approx((50 * 1.0 + 150 * 2.0) / 200)
    assert both.feedback_score == 0.8  # measured in one interval only: that one's


def _rolled_back_share(canaries: int, looks: int, *, spend: bool) -> float:
    """Canaries of a candidate equal to stable (same latency distribution, no errors), each step
    judged ``looks`` times on its growing window at 4 requests per revision per interval (a short
    analysis interval on a slow model), rolled back at two consecutive Failed looks."""
    bounds = (*(b * 1000 for b in LATENCY_BUCKETS), math.inf)
    limits = Analysis(min_requests=3, max_error_rate=0.05, max_p95_latency_ms=60_000, failure_limit=2)
    rng = np.random.default_rng(7)
    rolled_back = 0
    for _ in range(canaries):
        c, s, failures = np.empty(0), np.empty(0), 0
        for look in range(1, looks + 1):
            c = np.concatenate([c, rng.lognormal(math.log(0.035), 0.25, 4)])
            s = np.concatenate([s, rng.lognormal(math.log(0.035), 0.25, 4)])
            candidate = Figures(len(c), 0, Histogram.of(list(c * 1000), bounds))
            stable = Figures(len(s), 0, Histogram.of(list(s * 1000), bounds))
            failed = (
                judge(candidate, stable, limits, weight=50, look=look if spend else 1).outcome == "Failed"
            )
            failures = failures + 1 if failed else 0
            if failures == limits.failure_limit:
                rolled_back += 1
                break
    return rolled_back / canaries


def test_a_long_step_does_not_make_a_good_candidate_likelier_to_be_rolled_back() -> None:
    """CI once rolled back a candidate as fast as stable: each look at the same growing window was a
    new chance at p < 0.02, and a 30 s step judged every second had about 6% of them. The relative
    tests now spend ALPHA over the looks (ALPHA / (k (k + 1)) at the k-th)."""
    assert _rolled_back_share(400, 30, spend=True) <= ALPHA / 2
    assert _rolled_back_share(400, 30, spend=False) > ALPHA  # what a fixed significance gave


def test_the_significance_of_each_look_sums_to_alpha_and_a_clear_regression_still_fails_early() -> None:
    assert sum(look_alpha(k) for k in range(1, 100_000)) == pytest.approx(ALPHA, rel=1e-4)
    with pytest.raises(ValueError, match="counted from 1"):
        look_alpha(0)
    slow, stable = figures(50, 0, 200, 1), figures(50, 0, 100, 2)
    for look in (1, 2, 10):  # twice the latency at 50 requests each: p far below any look's alpha
        result = judge(slow, stable, LIMITS, look=look)
        assert result.outcome == "Failed", result.reason
        check = next(c for c in result.checks if c.metric == "latencyVsStable")
        assert check.statistics["alpha"] == look_alpha(look)
    # a modest regression that the first look fails is held at the hundredth (not yet significant)
    modest, same = figures(50, 0, 125, 3), figures(50, 0, 100, 4)
    assert judge(modest, same, LIMITS, look=1).outcome == "Failed"
    assert judge(modest, same, LIMITS, look=100).outcome == "Successful"
