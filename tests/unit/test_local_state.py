"""The embedded loop's state directory: one loop at a time, one model per directory, manual intents
queued as files and answered; and `autoglm rollout` against a stopped loop."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from autoglm_api.status import AutoGLMModelStatus, Revisions
from autoglm_operator.backends.local_state import LocalState, StateError
from autoglm_operator.cli.main import cli


def test_one_loop_and_one_model_per_directory(tmp_path: Path) -> None:
    state = LocalState(tmp_path / "s")
    assert not state.running()
    handle = state.claim("ml/tiny", tmp_path / "tiny.yaml")
    assert state.running()
    with pytest.raises(StateError, match=f"another autoglm run \\(pid {os.getpid()}\\)"):
        LocalState(tmp_path / "s").claim("ml/tiny", tmp_path / "tiny.yaml")
    state.release(handle)
    assert not state.running()
    with pytest.raises(StateError, match="holds the rollout of ml/tiny, not ml/other"):
        state.claim("ml/other", tmp_path / "other.yaml")
    state.release(state.claim("ml/tiny", tmp_path / "tiny.yaml"))  # the same model again: fine


def test_intents_wait_as_files_until_answered(tmp_path: Path) -> None:
    state = LocalState(tmp_path)
    first = state.submit("abort", "user:alice")
    second = state.submit("retry", "user:bob", "abc123")
    (tmp_path / "intents" / "0-junk.json").write_text("{not json")
    pending = state.pending()
    assert [i for _, i in pending] == [first, second]  # oldest first; the junk file set aside
    assert (tmp_path / "intents" / "0-junk.invalid").exists()
    assert state.outcome(first) is None
    state.done([p for p, _ in pending], ignored={second.at.isoformat(): "retry: nothing was rejected"})
    assert state.pending() == []
    assert state.outcome(first) == {**_file(first), "ignored": None}
    assert state.outcome(second)["ignored"] == "retry: nothing was rejected"  # type: ignore[index]
    with pytest.raises(StateError, match="allowed: promote, abort, retry"):
        state.submit("delete", "user:eve")  # type: ignore[arg-type]


def _file(intent: object) -> dict[str, object]:
    return {
        "kind": intent.kind,  # type: ignore[attr-defined]
        "actor": intent.actor,  # type: ignore[attr-defined]
        "at": intent.at.isoformat(),  # type: ignore[attr-defined]
        "revision": intent.revision,  # type: ignore[attr-defined]
    }


def test_a_pid_that_is_not_a_server_is_never_stopped(tmp_path: Path) -> None:
    state = LocalState(tmp_path)
    state.release(state.claim("ml/tiny", tmp_path / "t.yaml"))
    state.set_server("local", "http://127.0.0.1:1", os.getpid())  # this test process: not autoglm_inference
    assert state.stale_servers() == []


def test_rollout_commands_against_a_stopped_loop(tmp_path: Path) -> None:
    runner = CliRunner()
    empty = runner.invoke(cli, ["rollout", "status", "tiny", "--state-dir", str(tmp_path / "none")])
    assert empty.exit_code == 2
    assert "holds no rollout: start one with autoglm run MANIFEST" in empty.output
    state = LocalState(tmp_path)
    state.release(state.claim("ml/tiny", tmp_path / "tiny.yaml"))
    state.save_status(
        AutoGLMModelStatus(phase="RollingOut", revisions=Revisions(stable="a1", candidate="b2"))
    )
    shown = runner.invoke(cli, ["rollout", "status", "ml/tiny", "--state-dir", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert "loop: stopped" in shown.output
    assert "phase: RollingOut" in shown.output
    assert "candidate: b2" in shown.output
    queued = runner.invoke(
        cli, ["rollout", "abort", "tiny", "--state-dir", str(tmp_path), "--actor", "user:al"]
    )
    assert queued.exit_code == 0, queued.output
    assert "queued: the loop is stopped" in queued.output
    assert [i.actor for _, i in state.pending()] == ["user:al"]
    robot = runner.invoke(
        cli, ["rollout", "promote", "tiny", "--state-dir", str(tmp_path), "--actor", "operator"]
    )
    assert robot.exit_code == 2
    assert "comes from a person: user:NAME" in robot.output
    assert len(state.pending()) == 1  # nothing queued for a refused command


def test_the_server_is_listed_for_prometheus_file_sd_while_it_runs(tmp_path: Path) -> None:
    state = LocalState(tmp_path)
    state.release(state.claim("ml/tiny", tmp_path / "t.yaml"))
    state.set_server("local", "http://127.0.0.1:8123", 4242)
    state.set_server("edge", "http://127.0.0.1:8124", 4243)
    targets = json.loads((tmp_path / "prometheus-targets.json").read_text())
    assert targets == [
        {"targets": ["127.0.0.1:8124"], "labels": {"autoglm_loop": "ml/tiny", "autoglm_target": "edge"}},
        {"targets": ["127.0.0.1:8123"], "labels": {"autoglm_loop": "ml/tiny", "autoglm_target": "local"}},
    ]
    # a target label named like a metric label would rename the servers' own labels to exported_*
    assert not {"model", "revision", "target"} & set(targets[0]["labels"])
    state.clear_server("edge")
    assert [
        t["labels"]["autoglm_target"] for t in json.loads((tmp_path / "prometheus-targets.json").read_text())
    ] == ["local"]
    state.clear_server()
    assert json.loads((tmp_path / "prometheus-targets.json").read_text()) == []


def test_a_server_left_by_a_loop_of_the_version_before_is_found_and_stopped(tmp_path: Path) -> None:
    """That version kept one server as `serverPid`; the next loop must still stop it."""
    import subprocess
    import sys
    import time

    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "autoglm_inference"])
    try:
        state = LocalState(tmp_path)
        state.release(state.claim("ml/tiny", tmp_path / "t.yaml"))
        loop = json.loads((tmp_path / "loop.json").read_text())
        (tmp_path / "loop.json").write_text(json.dumps({**loop, "serverPid": orphan.pid, "url": "http://x"}))
        assert state.stale_servers() == [orphan.pid]
        started = time.monotonic()
        state.stop_server(orphan.pid)
        # Stopped at once: a child that died was reaped, not waited on until the 30 s timeout (a bug).
        assert time.monotonic() - started < 10
        assert orphan.wait(10) is not None
        state.clear_server()
        assert "serverPid" not in state.loop()
        assert state.stale_servers() == []
    finally:
        orphan.kill()
        orphan.wait()


def test_rollout_status_tells_where_a_retraining_stands(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from autoglm_api.spec import Training
    from autoglm_api.status import Retraining

    state = LocalState(tmp_path)
    state.release(state.claim("ml/tiny", tmp_path / "tiny.yaml"))
    tune = Training(dataset="file:///s/datasets/retrain-0123.jsonl", sha256="a" * 64)
    retraining = Retraining(candidate=tune, triggered_at=datetime(2026, 12, 3, 7, 0, tzinfo=UTC),
                            reason="drift 3.100 (vocabulary 3.100) is above driftAbove 1", revision="a1", examples=40)  # fmt: skip
    state.save_status(AutoGLMModelStatus(phase="RollingOut", revisions=Revisions(stable="a1", candidate="c3"),
                                         retraining=retraining))  # fmt: skip
    shown = CliRunner().invoke(cli, ["rollout", "status", "ml/tiny", "--state-dir", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert (
        "retraining (building or canarying, triggered 2026-12-03 07:00:00): drift 3.100 (vocabulary 3.100) is above "
        "driftAbove 1; 40 examples in file:///s/datasets/retrain-0123.jsonl"
    ) in shown.output
    done = retraining.model_copy(update={"candidate": None, "stable": tune, "outcome": "Promoted"})
    state.save_status(AutoGLMModelStatus(phase="Serving", revisions=Revisions(stable="c3"), retraining=done))
    shown = CliRunner().invoke(cli, ["rollout", "status", "ml/tiny", "--state-dir", str(tmp_path)])
    assert "retraining (promoted, triggered" in shown.output
