"""The prompt policy's decisions: when the shares move, by how much, and when a step is undone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from autoglm_api.spec import Analysis, PromptOptimization, PromptVariant
from autoglm_feedback.bandits import moved_share
from autoglm_feedback.policy import decide

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
OPT = PromptOptimization(
    enabled=True, algorithm="thompson",
    variants=[PromptVariant(name="concise", system="Be brief."), PromptVariant(name="detailed", system="Explain.")],
)  # fmt: skip
EVEN = {"concise": 0.5, "detailed": 0.5}


def test_nothing_moves_before_enough_feedback_or_for_a_small_change() -> None:
    assert decide(OPT, {"concise": (5, 5.0), "detailed": (5, 0.0)}, EVEN, now=NOW) is None  # 10 < 20 events
    assert decide(OPT, {"concise": (100, 50.0), "detailed": (100, 50.0)}, EVEN, now=NOW) is None  # a tie
    assert decide(OPT.model_copy(update={"enabled": False}), {"concise": (500, 500.0)}, EVEN, now=NOW) is None


def test_a_large_move_is_taken_in_steps_of_at_most_max_step() -> None:
    evidence = {"concise": (60, 55.0), "detailed": (60, 10.0)}
    first = decide(OPT, evidence, EVEN, now=NOW, max_step=0.25)
    assert first is not None
    assert first.kind == "PromptPolicyChanged"
    assert first.target["concise"] > 0.99
    assert first.shares == pytest.approx({"concise": 0.75, "detailed": 0.25})
    assert moved_share(EVEN, first.shares) == pytest.approx(0.25)
    assert "favours concise" in first.reason
    assert first.evidence["arms"]["concise"]["posterior"] == {"alpha": 56.0, "beta": 6.0}
    # Not again within the analysis interval; the next step after it.
    assert decide(OPT, evidence, first.shares, last_change=NOW, now=NOW + timedelta(seconds=30)) is None
    second = decide(
        OPT, evidence, first.shares, last_change=NOW, now=NOW + timedelta(minutes=1), max_step=0.25
    )
    assert second is not None
    assert second.shares["concise"] == pytest.approx(1.0, abs=0.01)
    assert first.key("r1") != second.key("r1")
    assert first.key("r1") == decide(OPT, evidence, EVEN, now=NOW, max_step=0.25).key("r1")  # type: ignore[union-attr]


def test_a_step_whose_variant_fails_the_gates_is_rolled_back_and_held() -> None:
    analysis = Analysis(min_requests=20, max_error_rate=0.01, max_p95_latency_ms=500)
    evidence = {"concise": (60, 55.0), "detailed": (60, 10.0)}
    stepped = {"concise": 0.75, "detailed": 0.25}
    features = {
        "concise": {"requests": 40, "error_rate": 0.1, "latency_p95_s": 0.2},
        "detailed": {"requests": 40},
    }
    back = decide(OPT, evidence, stepped, features=features, analysis=analysis, last_change=NOW,
                  now=NOW + timedelta(minutes=2))  # fmt: skip
    assert back is not None
    assert back.kind == "PromptPolicyRolledBack"
    assert back.shares == pytest.approx(EVEN)
    assert back.reason.endswith("concise: error rate 0.1 > 0.01")
    # Held: the bandit may not push it past an equal share again.
    assert (
        decide(OPT, evidence, back.shares, held=frozenset({"concise"}), now=NOW + timedelta(minutes=5))
        is None
    )
    # Few requests: not judged yet.
    few = {"concise": {"requests": 5, "error_rate": 0.5}}
    step = decide(
        OPT,
        evidence,
        stepped,
        features=few,
        analysis=analysis,
        last_change=NOW,
        now=NOW + timedelta(minutes=2),
    )
    assert step is not None
    assert step.kind == "PromptPolicyChanged"


def test_a_limit_every_variant_breaks_is_not_the_prompts_fault() -> None:
    """A slow model: both variants over the latency limit, the gaining one no slower: the step holds."""
    analysis = Analysis(min_requests=20, max_p95_latency_ms=500)
    evidence = {"concise": (60, 55.0), "detailed": (60, 10.0)}
    slow = {
        "concise": {"requests": 40, "latency_p95_s": 0.9},
        "detailed": {"requests": 40, "latency_p95_s": 1.4},
    }
    step = decide(OPT, evidence, {"concise": 0.75, "detailed": 0.25}, features=slow, analysis=analysis,
                  last_change=NOW, now=NOW + timedelta(minutes=2))  # fmt: skip
    assert step is not None
    assert step.kind == "PromptPolicyChanged"
    slower = {**slow, "concise": {"requests": 40, "latency_p95_s": 2.0}}
    back = decide(OPT, evidence, {"concise": 0.75, "detailed": 0.25}, features=slower, analysis=analysis,
                  last_change=NOW, now=NOW + timedelta(minutes=2))  # fmt: skip
    assert back is not None
    assert back.kind == "PromptPolicyRolledBack"
    assert "p95 latency 2e+03 ms > 500 ms (another variant: 1.4e+03 ms)" in back.reason


def test_a_variant_with_few_requests_still_counts_as_the_comparison() -> None:
    """Seen on SmolLM2: the losing variant had 15 requests (< minRequests), both p95s 16.8 s over a
    2 s limit; the gaining one must not be rolled back for the model's own slowness."""
    analysis = Analysis(min_requests=20, max_p95_latency_ms=2000)
    evidence = {"concise": (21, 6.4), "detailed": (15, 0.8)}
    figures = {
        "concise": {"requests": 21, "latency_p95_s": 16.82},
        "detailed": {"requests": 15, "latency_p95_s": 16.82},
    }
    step = decide(OPT, evidence, {"concise": 0.75, "detailed": 0.25}, features=figures, analysis=analysis,
                  last_change=NOW, now=NOW + timedelta(minutes=2))  # fmt: skip
    assert step is not None
    assert step.kind == "PromptPolicyChanged"
