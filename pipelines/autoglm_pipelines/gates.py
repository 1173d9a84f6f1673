"""Validation gates: pure verdicts from measured figures and the spec's thresholds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from autoglm_api.spec import Gates
from autoglm_core.camel import CamelModel


class GateResult(CamelModel, frozen=True):
    name: str
    value: float
    threshold: float
    passed: bool
    #: How value and threshold compare when the gate passes, for messages: "<=" or ">=".
    comparison: Literal["<=", ">="]

    def describe(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return f"{self.name} {verdict}: {self.value:.4g} (must be {self.comparison} {self.threshold:.4g})"


def quality_loss(metric: str, baseline: float, candidate: float) -> float:
    """Relative quality loss: perplexity up, or accuracy down, as a fraction of the baseline (>= 0 is worse)."""
    if metric == "perplexity":
        return candidate / baseline - 1.0
    return (baseline - candidate) / baseline if baseline else 0.0


#: The held-out gate of a fine-tuned candidate: its answers' NLL over the stable artifact's (or the
#: source's), at most this.
HELD_OUT_RATIO = 1.0


def evaluate_gates(
    gates: Gates,
    *,
    quality_loss: float,
    p95_token_latency_ms: float,
    size_reduction: float,
    held_out_nll_ratio: float | None = None,
    quality_loss_vs_stable: float | None = None,
) -> list[GateResult]:
    """Every gate with its measured value, threshold and verdict. A fine-tuned candidate (``spec.training``)
    also has ``heldOutNllRatio``: the held-out examples' answers must be at least as likely under it as
    under the stable revision's artifact, or the source without one (the fine-tune learned what users
    preferred, and compression kept it); and, with a stable artifact (``training.against``),
    ``maxQualityLossVsStable``: its quality loss on the validation text against that artifact, within
    the same ``maxQualityLoss`` (what it knew before must not be lost to what users taught it)."""
    held = (
        [GateResult(name="heldOutNllRatio", value=held_out_nll_ratio, threshold=HELD_OUT_RATIO,
                    passed=held_out_nll_ratio <= HELD_OUT_RATIO, comparison="<=")]
        if held_out_nll_ratio is not None else []
    )  # fmt: skip
    versus_stable = (
        [GateResult(name="maxQualityLossVsStable", value=quality_loss_vs_stable,
                    threshold=gates.max_quality_loss,
                    passed=quality_loss_vs_stable <= gates.max_quality_loss, comparison="<=")]
        if quality_loss_vs_stable is not None else []
    )  # fmt: skip
    return [
        *held,
        *versus_stable,
        GateResult(
            name="maxQualityLoss",
            value=quality_loss,
            threshold=gates.max_quality_loss,
            passed=quality_loss <= gates.max_quality_loss,
            comparison="<=",
        ),
        GateResult(
            name="maxP95LatencyMs",
            value=p95_token_latency_ms,
            threshold=gates.max_p95_latency_ms,
            passed=p95_token_latency_ms <= gates.max_p95_latency_ms,
            comparison="<=",
        ),
        GateResult(
            name="minSizeReduction",
            value=size_reduction,
            threshold=gates.min_size_reduction,
            passed=size_reduction >= gates.min_size_reduction,
            comparison=">=",
        ),
    ]


@dataclass(frozen=True)
class Verdict:
    """What the gates decided about a candidate, as the audit ledger records it."""

    decision: Literal["GatePassed", "GateFailed"]
    reason: str
    #: The gates and the figures they judged: the record's evidence.
    evidence: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.decision == "GatePassed"


def verdict_of(report: Mapping[str, Any]) -> Verdict:
    """The verdict of a validate report (``validate.json``): passed only when every gate passed."""
    failed = [g["name"] for g in report["gates"] if not g["passed"]]
    evidence = {
        "gates": report["gates"],
        "qualityLoss": report["qualityLoss"],
        "sizeReduction": report["sizeReduction"],
        "decodeSpeedup": report.get("decodeSpeedup"),
        **({"heldOut": report["heldOut"]} if "heldOut" in report else {}),
        **({"qualityLossVsStable": report["qualityLossVsStable"]} if "qualityLossVsStable" in report else {}),
    }
    if failed:
        return Verdict("GateFailed", "gate failed: " + ", ".join(failed), evidence)
    return Verdict("GatePassed", "all gates passed", evidence)
