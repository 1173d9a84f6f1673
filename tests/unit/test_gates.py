"""The gates' verdicts: pure functions of the measured figures and the spec's thresholds."""

from __future__ import annotations

from typing import Any

import pytest

from autoglm_api.spec import Gates
from autoglm_pipelines.gates import evaluate_gates, verdict_of


def report(**figures: float) -> dict[str, Any]:
    """A validate report as the validate step writes it, for these figures and the default gates."""
    values = {"quality_loss": 0.01, "p95_token_latency_ms": 50.0, "size_reduction": 3.9} | figures
    gates = evaluate_gates(Gates(), **values)
    return {
        "qualityLoss": values["quality_loss"],
        "sizeReduction": values["size_reduction"],
        "decodeSpeedup": 1.4,
        "gates": [g.to_json() for g in gates],
    }


def test_every_gate_passing_is_gate_passed_with_the_figures_as_evidence() -> None:
    verdict = verdict_of(report())
    assert verdict.passed
    assert verdict.decision == "GatePassed"
    assert verdict.reason == "all gates passed"
    assert verdict.evidence["sizeReduction"] == pytest.approx(3.9)
    assert [g["name"] for g in verdict.evidence["gates"]] == [
        "maxQualityLoss",
        "maxP95LatencyMs",
        "minSizeReduction",
    ]


def test_one_failed_gate_fails_the_candidate_and_is_named() -> None:
    limits = Gates()
    verdict = verdict_of(report(quality_loss=limits.max_quality_loss * 2, size_reduction=0.5))
    assert not verdict.passed
    assert verdict.decision == "GateFailed"
    assert verdict.reason == "gate failed: maxQualityLoss, minSizeReduction"


def test_a_figure_on_the_threshold_passes() -> None:
    limits = Gates()
    assert verdict_of(
        report(quality_loss=limits.max_quality_loss, size_reduction=limits.min_size_reduction)
    ).passed


def test_a_fine_tuned_candidate_is_also_held_to_the_quality_budget_against_the_stable_artifact() -> None:
    limits = Gates()
    # within the budget against the source, but it lost more than the budget against what serves now
    verdict = verdict_of(
        report(quality_loss=0.0, held_out_nll_ratio=0.8, quality_loss_vs_stable=limits.max_quality_loss * 1.5)
    )
    assert not verdict.passed
    assert verdict.reason == "gate failed: maxQualityLossVsStable"
    assert verdict_of(report(held_out_nll_ratio=0.8, quality_loss_vs_stable=-0.05)).passed
    # a plain candidate has no stable artifact to be judged against: no such gate
    assert "maxQualityLossVsStable" not in [g["name"] for g in verdict_of(report()).evidence["gates"]]
