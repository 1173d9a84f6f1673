"""The canary's interval analysis over a figures source: which judgements spend significance."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from autoglm_api.spec import Analysis
from autoglm_api.status import AutoGLMModelStatus, CanaryStatus, Revisions
from autoglm_operator.analysis import CanaryAnalyst
from autoglm_operator.canary import LATENCY_VS_STABLE, Figures, Histogram, look_alpha

CANDIDATE, STABLE = "c0ffee000001", "c0ffee000002"
BOUNDS = (25.0, 50.0, 100.0, math.inf)
LIMITS = Analysis(interval="1s", min_requests=3, max_error_rate=0.5, max_p95_latency_ms=10_000.0)


class Scripted:
    """A figures source that answers each read with the next of ``answers`` (per revision: requests)."""

    description = "scripted"

    def __init__(self, answers: list[tuple[int, int]]) -> None:
        self.answers = answers

    def begin(self, now: datetime) -> None:
        pass

    def read(self, model: str, revisions: Sequence[str], now: datetime) -> dict[str, Figures | None]:
        ours, theirs = self.answers.pop(0)
        return {CANDIDATE: _equal(ours), STABLE: _equal(theirs)}


def _equal(n: int) -> Figures:
    """``n`` requests all in the 25-50 ms bucket: a candidate exactly as fast as stable."""
    return Figures(requests=n, errors=0, latency=Histogram(BOUNDS, (0, n, 0, 0)))


def _alphas(answers: list[tuple[int, int]]) -> list[float | None]:
    """The relative tests' significance at each judgement (None: no test ran)."""
    analyst = CanaryAnalyst(source_for=lambda _target: Scripted(list(answers)), log=lambda _line: None)
    status = AutoGLMModelStatus(
        revisions=Revisions(stable=STABLE, candidate=CANDIDATE), canary=CanaryStatus(step=0, weight=50)
    )
    start = datetime(2026, 1, 1, tzinfo=UTC)
    args = (LIMITS, status, {"local": (CANDIDATE, STABLE)}, {"local": "http://server"}, lambda _t: "tiny")
    analyst.analyse(*args, start)  # begins the window
    alphas: list[float | None] = []
    for second in range(1, len(answers) + 1):
        analyses, _ = analyst.analyse(*args, start + timedelta(seconds=second))
        checks = {c.metric: c for c in analyses["local"].result.checks}
        latency = checks.get(LATENCY_VS_STABLE)
        alphas.append(latency.statistics["alpha"] if latency else None)
    return alphas


def test_judgements_with_too_few_requests_to_test_spend_no_significance() -> None:
    # two looks with fewer than minRequests on a side, then three that test
    alphas = _alphas([(1, 1), (2, 5), (4, 4), (6, 6), (8, 8)])
    assert alphas == [None, None, look_alpha(1), look_alpha(2), look_alpha(3)]


def test_every_look_that_tests_spends_its_share() -> None:
    alphas = _alphas([(4, 4), (6, 6), (8, 8)])
    assert alphas == [look_alpha(1), look_alpha(2), look_alpha(3)]
