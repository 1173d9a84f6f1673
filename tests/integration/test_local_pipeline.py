"""The embedded loop's pipeline backend: one run per revision, observed through STEP.json."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from autoglm_api.validation import load_manifest
from autoglm_core.revision import artifact_revision, source_revision
from autoglm_core.variants import target_revisions
from autoglm_operator.backends.local_pipeline import LocalPipelines
from autoglm_operator.plan import Action
from tests.support.tiny_models import tiny_glm
from tests.unit.test_pipeline_steps import manifest

pytestmark = pytest.mark.integration


def test_a_revision_is_built_once_and_observed_until_it_publishes(tmp_path: Path) -> None:
    model = load_manifest(str(manifest(tmp_path, tiny_glm(tmp_path / "glm"))))
    rev = artifact_revision(model.spec)
    env = {
        **os.environ,
        "AUTOGLM_CACHE_DIR": str(tmp_path / "cache"),
        "AUTOGLM_AUDIT_URL": f"sqlite:///{tmp_path / 'audit.db'}",
    }
    pipelines = LocalPipelines(tmp_path / "runs", extra_args=("--decode-tokens", "4"), env=env)
    assert pipelines.observe(rev) is None
    pipelines.start(model, Action("StartPipeline", rev, attempt=1, baseline=True))
    first_pid = (pipelines.folder(rev) / "pipeline.pid").read_text()
    pipelines.start(model, Action("StartPipeline", rev, attempt=1))  # a restart asks again: not twice
    assert (pipelines.folder(rev) / "pipeline.pid").read_text() == first_pid
    assert pipelines.observe(rev).phase == "Running"  # type: ignore[union-attr]
    deadline = time.monotonic() + 240
    while (
        (run := pipelines.observe(rev)) is not None and run.phase == "Running" and time.monotonic() < deadline
    ):
        time.sleep(1)
    assert run is not None
    assert (run.phase, run.gates_passed) == ("Succeeded", True), (
        pipelines.folder(rev) / "pipeline.log"
    ).read_text()[-2000:]
    assert run.artifact_uri is not None
    assert json.loads((Path(run.artifact_uri) / "model-card.json").read_text())["revision"] == rev
    assert run.baseline is not None  # a first rollout's run: the source published beside it
    assert run.baseline.revision == source_revision(model.spec)
    assert json.loads((Path(run.baseline.uri) / "model-card.json").read_text())["role"] == "baseline"
    assert run.baseline.weight_bytes > run.artifact_bytes > 0  # type: ignore[operator]
    assert pipelines.artifact(rev) == run.artifact_uri
    assert pipelines.artifact(run.baseline.revision) == run.baseline.uri  # found after a restart too
    assert pipelines.artifact("src-000000000000") is None
    pipelines.start(model, Action("StartPipeline", rev, attempt=1))  # published: not started again
    assert (pipelines.folder(rev) / "pipeline.pid").read_text() == first_pid
    pipelines.close()


def write(path: Path, data: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_failures_and_failed_gates_are_told_apart(tmp_path: Path) -> None:
    pipelines = LocalPipelines(tmp_path)
    gates = tmp_path / "g" / "work" / "validate"
    write(gates / "validate.json", {"passed": False, "gates": [{"name": "maxQualityLoss", "passed": False}]})
    write(gates / "STEP.json", {"status": "Failed", "reason": "gate failed"})
    run = pipelines.observe("g")
    assert run is not None
    assert (run.phase, run.gates_passed, run.reason) == ("Succeeded", False, "gate failed: maxQualityLoss")
    write(tmp_path / "f" / "work" / "compress" / "STEP.json", {"status": "Failed", "reason": "out of memory"})
    assert pipelines.observe("f").reason == "compress: out of memory"  # type: ignore[union-attr]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "pipeline.log").write_text("Traceback...\nKilled\n")
    crashed = pipelines.observe("c")
    assert crashed is not None
    assert crashed.phase == "Failed"
    assert "Killed" in crashed.reason


def test_a_run_succeeds_only_when_every_target_precisions_variant_published(tmp_path: Path) -> None:
    """One variant's failed gate rejects the rollout: its targets are promoted together or not at all."""
    model = load_manifest(
        str(
            manifest(
                tmp_path, tmp_path / "glm", targets=[{"name": "local"}, {"name": "edge", "precision": "int4"}]
            )
        )
    )
    rev = artifact_revision(model.spec)
    pipelines = LocalPipelines(tmp_path / "runs")
    folder = pipelines.folder(rev)
    (folder / "work").mkdir(parents=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump(model.to_json()))
    own = {"status": "Succeeded", "metrics": {"artifact": "/a/own", "revision": rev, "artifactBytes": 10}}
    write(folder / "work" / "publish" / "STEP.json", own)
    report = {"passed": False, "gates": [{"name": "maxQualityLoss", "passed": False}]}
    write(folder / "work" / "validate-int4" / "validate.json", report)
    write(folder / "work" / "validate-int4" / "STEP.json", {"status": "Failed", "reason": "gate failed"})
    run = pipelines.observe(rev)
    assert run is not None
    assert (run.phase, run.gates_passed) == ("Succeeded", False)
    assert run.reason == "gate failed (variant int4): maxQualityLoss"
    edge = target_revisions(model.spec)["edge"]
    write(folder / "work" / "publish-int4" / "STEP.json",
          {"status": "Succeeded", "metrics": {"artifact": "/a/int4", "revision": edge, "artifactBytes": 4}})  # fmt: skip
    run = pipelines.observe(rev)
    assert run is not None
    assert (run.phase, run.gates_passed, run.artifact_uri) == ("Succeeded", True, "/a/own")
    assert [(v.revision, v.uri) for v in run.variants] == [(rev, "/a/own"), (edge, "/a/int4")]
