"""Canary retraining on the bundled example's real parts: SmolLM2-135M-Instruct compressed to int8
and served by `autoglm run`, simulated users who prefer short answers rating its real outputs,
their questions drifting to another topic; the drift triggers a retraining revision that
fine-tunes SmolLM2 on the better half of the rated answers (LoRA), is compressed, validated on
Hamlet and on held-out feedback, and canaried against stable on the users' traffic. Every step is
in the ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from autoglm_api.validation import load_manifest
from autoglm_core.audit import Ledger
from autoglm_operator.embedded import EmbeddedLoop, LoopOptions
from tests.support.loop import isolated_loop_env

# About 15 minutes on 2 cores (two pipelines of SmolLM2, one with a fine-tune, and two canaries).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]


def test_drifted_questions_trigger_a_retraining_revision_of_smollm2_that_goes_through_the_canary(
    tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = isolated_loop_env(tmp_path, monkeypatch)
    doc = yaml.safe_load((repo_root / "examples" / "autoglm-model.yaml").read_text())
    doc["spec"]["rollout"]["steps"] = [{"weight": 50, "pause": "20s"}, {"weight": 100}]
    # the users rate SmolLM2's answers about 0.35 (they are 40 tokens long): judge the canary on
    # the other figures and on the candidate not being significantly worse than stable
    doc["spec"]["rollout"]["analysis"]["minFeedbackScore"] = 0.0
    # the users' chat answers run to 64 tokens, not the demo traffic's 8: 2 s was measured for 8
    doc["spec"]["rollout"]["analysis"]["maxP95LatencyMs"] = 15000
    doc["spec"]["feedback"]["retraining"] = {
        "enabled": True, "feedbackScoreBelow": 0.0, "driftAbove": 1.0, "minFeedback": 60,
    }  # fmt: skip
    path = tmp_path / "autoglm-model.yaml"
    path.write_text(yaml.safe_dump(doc))
    lines: list[str] = []
    options = LoopOptions(
        state_dir=tmp_path / "state", until="retrained", traffic_rate=2, simulated_users="short",
        drift_after=80, drift_window=40, timeout_seconds=2100, audit_url=audit,
        pipeline_args=("--decode-tokens", "16"), log=lines.append,
    )  # fmt: skip
    loop = EmbeddedLoop(path, options)
    try:
        status = loop.run()
    finally:
        loop.close()
    log = "\n".join(lines)
    retraining = status.retraining
    assert retraining is not None, log
    assert retraining.triggered_at is not None, log
    with Ledger(audit) as ledger:
        records = list(ledger.query(namespace="ml", model="support-glm", limit=500))
    triggers = [r for r in records if r.decision == "RetrainingTriggered"]
    assert triggers, log
    trigger = triggers[0]
    new = trigger.evidence["retrainingRevision"]
    assert trigger.evidence["drift"]["drift_statistic"] > 1.0
    assert trigger.evidence["dataset"]["kept"] >= 8
    assert trigger.evidence["dataset"]["lowScored"] > 0  # the worse half is left out
    kinds = {r.decision for r in records if r.revision == new}
    assert "PipelineStarted" in kinds, log
    assert "GatePassed" in kinds, (log, [r.reason for r in records if r.revision == new])
    assert "CanaryStarted" in kinds, log
    assert retraining.outcome in ("Promoted", "Rejected")
    if retraining.outcome == "Promoted":
        assert status.revisions.stable == new
        assert "Promoted" in kinds
    else:  # the canary judged it worse than stable on live traffic: stable serves on
        assert "RolledBack" in kinds
        assert status.revisions.stable == trigger.revision
    assert load_manifest(str(path)).spec.training is None
