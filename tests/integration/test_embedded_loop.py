"""`autoglm run` on a tiny GLM: the first revision is canaried against the uncompressed source,
served first as the baseline, and promoted; an edit is canaried against it on demo traffic and
promoted; every decision is in the ledger once."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoglm_api.validation import load_manifest
from autoglm_core.audit import Ledger
from autoglm_core.revision import artifact_revision, source_revision
from autoglm_operator.embedded import EmbeddedLoop, LoopOptions
from tests.support.tiny_models import tiny_glm
from tests.unit.test_pipeline_steps import manifest

pytestmark = pytest.mark.integration


ROLLOUT = {
    "strategy": "canary",
    "steps": [{"weight": 50, "pause": "2s"}, {"weight": 100}],
    "analysis": {
        "interval": "1s",
        "failureLimit": 2,
        "minRequests": 3,
        "maxErrorRate": 0.5,
        "maxP95LatencyMs": 60_000,
        "maxJoulesPerToken": 1000,
    },
}


def write(tmp_path: Path, source: Path, method: str) -> Path:
    """The pipeline tests' tiny manifest, with a fast canary."""
    return manifest(tmp_path, source, compression={"quantization": {"method": method}}, rollout=ROLLOUT)


def test_first_rollout_then_a_canary_promoted_on_live_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOGLM_CACHE_DIR", str(tmp_path / "cache"))
    audit = f"sqlite:///{tmp_path / 'state' / 'audit.db'}"
    monkeypatch.setenv("AUTOGLM_AUDIT_URL", audit)  # the pipeline's GatePassed goes to the same ledger
    source = tiny_glm(tmp_path / "glm", init_std=0.3, seed=3)
    path = write(tmp_path, source, "int8-weight-only")
    options = LoopOptions(
        state_dir=tmp_path / "state", traffic_rate=6, tick_seconds=0.5, timeout_seconds=400,
        audit_url=audit, pipeline_args=("--decode-tokens", "4"), log=lambda _line: None,
    )  # fmt: skip
    loop = EmbeddedLoop(path, options)
    try:
        first = loop.run()
        assert first.phase == "Serving"
        old = first.revisions.stable
        assert old is not None
        assert old == artifact_revision(load_manifest(str(path)).spec)
        assert first.revisions.baseline is None  # the source left once the candidate was promoted
        write(tmp_path, source, "int4-weight-only")  # an edit: a new revision, canaried against old
        second = loop.run()
        assert second.revisions.stable not in (None, old), second
        assert second.revisions.rejected is None
    finally:
        loop.close()
    with Ledger(audit) as ledger:
        records = list(ledger.query(namespace="ml", model="tiny", limit=100))
    kinds = [r.decision for r in records]
    assert kinds.count("Promoted") == 2
    assert kinds.count("CanaryStarted") == 2
    assert "CanaryAdvanced" in kinds
    assert kinds.count("GatePassed") == 2  # recorded by the pipeline runs themselves
    (served,) = [r for r in records if r.decision == "BaselineServed"]
    baseline = source_revision(load_manifest(str(path)).spec)
    assert served.revision == baseline
    assert served.evidence["candidate"] == old
    first_promotion = next(r for r in records if r.decision == "Promoted")
    assert first_promotion.revision == old
    assert first_promotion.evidence["against"] == "baseline"
    assert first_promotion.evidence["previous"] == baseline
    assert first_promotion.evidence["analysis"]["outcome"] == "Successful"
    advanced = next(r for r in records if r.decision == "CanaryAdvanced")  # at 50%: both served traffic
    assert advanced.revision == old
    assert advanced.evidence["analysis"]["stable"] == baseline
    assert advanced.evidence["analysis"]["stableFigures"]["requests"] >= 3
