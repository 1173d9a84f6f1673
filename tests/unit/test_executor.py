"""The local runner tells a reused step from a run one by its STEP.json, never by its output."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from autoglm_pipelines.executor import _reused, run_step_process
from autoglm_pipelines.results import StepResult
from tests.support.tiny_models import tiny_gguf
from tests.unit.test_pipeline_steps import manifest

EARLIER = StepResult(
    step="fetch",
    status="Succeeded",
    inputs_digest="d" * 64,
    started_at="2026-12-01T10:00:00+00:00",
    duration_seconds=3.0,
)


def replace(result: StepResult, **changes: object) -> StepResult:
    return result.model_copy(update=changes)


def test_an_untouched_success_is_reused() -> None:
    assert _reused(EARLIER, replace(EARLIER))


def test_a_step_that_ran_again_is_not_reused() -> None:
    assert not _reused(EARLIER, replace(EARLIER, started_at="2026-12-01T11:00:00+00:00"))
    assert not _reused(EARLIER, replace(EARLIER, inputs_digest="e" * 64))


def test_a_first_run_or_a_failure_is_not_reused() -> None:
    assert not _reused(None, EARLIER)
    assert not _reused(EARLIER, None)
    failed = replace(EARLIER, status="Failed")
    assert not _reused(failed, failed)


def test_a_step_runs_in_the_runners_directory_and_environment_of_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps fork from a server started at the first step; they must not see its old cwd or env."""
    code, stderr = run_step_process(["fetch", "--spec", "tiny.yaml", "--workdir", str(tmp_path / "w")])
    assert code != 0
    assert "tiny.yaml" in stderr  # named in the error: there is no such file here
    gguf = tiny_gguf(tmp_path / "tiny.gguf")  # fetch converts it into the cache dir
    path = manifest(tmp_path, gguf)  # tmp_path/tiny.yaml
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["source"] = {"uri": f"file://{gguf}", "format": "gguf"}
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOGLM_CACHE_DIR", str(tmp_path / "cache-of-now"))
    code, stderr = run_step_process(["fetch", "--spec", "tiny.yaml", "--workdir", "w"])
    assert code == 0, stderr
    assert (tmp_path / "w" / "fetch" / "STEP.json").is_file()
    assert (tmp_path / "cache-of-now").is_dir()  # the env of now, not the fork server's
