"""Canary scenarios of the embedded loop on real servers and real pipelines (a tiny GLM).

A stable revision is rolled out once; then each scenario edits the manifest into a new candidate
(a new calibration sample count: a new revision) which the real `autoglm serve` makes worse in one
way with its test-only fault injection: twice the latency, 10% errors, joules per token over the
limit, or its metrics source down. Each is judged on live demo traffic, and each scenario's ledger
is read back with `autoglm audit query`, as an operator would read it.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from autoglm_api.status import AutoGLMModelStatus
from autoglm_api.validation import load_manifest
from autoglm_core.revision import source_revision
from autoglm_core.variants import rollout_revision
from autoglm_inference.faults import ENABLE_ENV
from autoglm_operator.backends.local_state import LocalState
from autoglm_operator.cli.main import cli
from autoglm_operator.embedded import EmbeddedLoop, LoopOptions
from tests.support.loop import isolated_loop_env, promoted_kinds
from tests.support.prometheus import prometheus
from tests.support.tiny_models import tiny_glm
from tests.unit.test_pipeline_steps import manifest

pytestmark = pytest.mark.integration

FAILURE_LIMIT = 2
MAX_JOULES_PER_TOKEN = 2.0  # the tiny GLM spends about 0.05 J per token on the CPU-time model
ROLLOUT = {
    "strategy": "canary",
    "steps": [{"weight": 50, "pause": "6s"}, {"weight": 100, "pause": "2s"}],
    "analysis": {
        "interval": "1s",
        "failureLimit": FAILURE_LIMIT,
        "minRequests": 3,
        "maxErrorRate": 0.05,
        "maxP95LatencyMs": 60_000,
        "maxJoulesPerToken": MAX_JOULES_PER_TOKEN,
    },
}


@dataclass
class World:
    root: Path
    source: Path
    faults: Path
    audit: str
    loop: EmbeddedLoop

    def edit(self, samples: int, rollout: dict[str, Any] = ROLLOUT) -> str:
        """Rewrite the manifest into a new candidate; its revision."""
        path = manifest(
            self.root, self.source, calibration={"samples": samples, "sequenceLength": 64}, rollout=rollout,
            engine="torch",
        )  # fmt: skip
        return rollout_revision(load_manifest(str(path)).spec)

    def fault(self, revision: str | None = None, *, metrics_down: bool = False, **fault: float) -> None:
        data = json.loads(self.faults.read_text())
        if revision is not None:
            data.setdefault("revisions", {})[revision] = fault
        data["metricsDown"] = metrics_down
        self.faults.write_text(json.dumps(data))

    def records(self, revision: str | None = None) -> list[dict[str, Any]]:
        """`autoglm audit query --model ml/tiny -o json`, as a person would run it."""
        args = ["audit", "--db", self.audit, "query", "--model", "ml/tiny", "-o", "json"]
        result = CliRunner().invoke(cli, [*args, *(["--revision", revision] if revision else [])])
        assert result.exit_code == 0, result.output
        records: list[dict[str, Any]] = json.loads(result.output)
        return records


def _options(state: Path, audit: str, faults: Path) -> LoopOptions:
    return LoopOptions(
        state_dir=state, traffic_rate=8, tick_seconds=0.25, timeout_seconds=300, audit_url=audit,
        pipeline_args=("--decode-tokens", "4"), server_args=("--test-faults", str(faults)),
        log=lambda _line: None,
    )  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("scenarios")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ENABLE_ENV, "1")
        env.setenv("AUTOGLM_CACHE_DIR", str(root / "cache"))
        audit = f"sqlite:///{root / 'audit.db'}"
        env.setenv("AUTOGLM_AUDIT_URL", audit)  # the pipelines' GatePassed go to the same ledger
        faults = root / "faults.json"
        source = tiny_glm(root / "glm", init_std=0.3, seed=3)
        path = manifest(root, source, rollout=ROLLOUT, engine="torch")
        # The first rollout is canaried against the fp32 source: slowed, so that it is promoted (on
        # a tiny GLM a compressed variant is no faster than fp32; that race is not under test here).
        baseline = source_revision(load_manifest(str(path)).spec)
        faults.write_text(json.dumps({"revisions": {baseline: {"latencyFactor": 3.0}}}))
        loop = EmbeddedLoop(path, _options(root / "state", audit, faults))
        try:
            first = loop.run()  # the first rollout: on its offline gates alone
            assert first.phase == "Serving"
            yield World(root, source, faults, audit, loop)
        finally:
            loop.close()


def _kinds(records: list[dict[str, Any]]) -> list[str]:
    return [r["decision"] for r in records]


def _rolled_back(world: World, revision: str, stable: str | None, metric: str) -> None:
    status = world.loop.run()
    assert status.revisions.rejected == revision
    assert status.revisions.stable == stable  # untouched
    assert status.revisions.candidate is None
    assert world.loop.server is not None
    records = world.records(revision)
    kinds = _kinds(records)
    assert "Promoted" not in kinds
    assert kinds.count("CanaryIntervalFailed") == FAILURE_LIMIT
    assert kinds[-1] == "RolledBack"
    rollback = records[-1]
    assert metric in rollback["reason"]
    checks = {c["metric"]: c for c in rollback["evidence"]["analysis"]["checks"]}
    assert checks[metric]["passed"] is False
    assert checks[metric]["value"] is not None
    failed = [r for r in records if r["decision"] == "CanaryIntervalFailed"]
    # within failureLimit intervals: the failures are consecutive analyses, none passed in between
    assert all(r["evidence"]["analysis"]["outcome"] == "Failed" for r in failed)
    # one judgement per analysis.interval (1s), not one per tick (0.25s)
    times = [datetime.fromisoformat(r["time"]) for r in failed]
    assert all(later - earlier >= timedelta(seconds=0.9) for earlier, later in itertools.pairwise(times))


def test_a_good_candidate_is_promoted(world: World) -> None:
    revision = world.edit(samples=5)
    status = world.loop.run()
    assert status.revisions.stable == revision
    kinds = promoted_kinds(_kinds(world.records(revision)), FAILURE_LIMIT)
    assert kinds == ["PipelineStarted", "GatePassed", "CanaryStarted", "CanaryAdvanced", "Promoted"]
    promoted = world.records(revision)[-1]
    assert promoted["evidence"]["analysis"]["outcome"] == "Successful"


@pytest.mark.parametrize(
    ("samples", "fault", "metric"),
    [
        (6, {"latencyFactor": 2.0}, "latencyVsStable"),  # twice the latency: the rank test
        (7, {"errorRate": 0.1}, "errorRate"),  # 10% errors: over maxErrorRate 0.05
        (8, {"joulesFactor": 200.0}, "joulesPerToken"),  # about 10 J per token: over the limit
    ],
    ids=["twice-the-latency", "ten-percent-errors", "joules-over-the-limit"],
)
def test_a_worse_candidate_is_rolled_back_within_failure_limit_intervals(
    world: World, samples: int, fault: dict[str, float], metric: str
) -> None:
    stable = world.loop.load().status.revisions.stable  # type: ignore[union-attr]
    revision = world.edit(samples=samples)
    world.fault(revision, **fault)
    _rolled_back(world, revision, stable, metric)


def test_promql_against_a_real_prometheus_rolls_back_a_slow_candidate(world: World) -> None:
    """``autoglm run --prometheus-url``: the same judgement from a Prometheus that scrapes the loop's
    server through the targets file the loop writes."""
    state_dir = world.loop.options.state_dir
    stable = world.loop.load().status.revisions.stable  # type: ignore[union-attr]
    revision = world.edit(samples=11)
    world.fault(revision, latencyFactor=2.0)
    with prometheus(world.root / "prometheus", state_dir / "prometheus-targets.json") as prom:
        prom.scraped()
        world.loop.options.prometheus_url = prom.url
        try:
            _rolled_back(world, revision, stable, "latencyVsStable")
        finally:
            world.loop.options.prometheus_url = None
    rollback = world.records(revision)[-1]["evidence"]["analysis"]
    assert rollback["source"] == f"PromQL against {prom.url}"
    assert any(q.startswith("sum by (revision, le) (increase(") for q in rollback["queries"])
    assert rollback["candidateFigures"]["requests"] >= 3


def test_the_metrics_source_down_holds_the_canary(world: World) -> None:
    revision = world.edit(samples=9)
    world.fault(metrics_down=True)
    state = LocalState(world.loop.options.state_dir)
    done: list[AutoGLMModelStatus] = []
    runner = threading.Thread(target=lambda: done.append(world.loop.run()))
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status, analysis = state.status(), state.analysis()
            if status and status.canary.step == 0 and analysis and analysis.get("revision") == revision:
                break
            time.sleep(0.2)
        time.sleep(10)  # longer than the step's pause and failureLimit intervals together
        status = state.status()
        assert status is not None
        assert (status.revisions.candidate, status.canary.step, status.canary.weight) == (revision, 0, 50)
        assert status.canary.failures == 0
        assert state.analysis()["outcome"] == "Inconclusive"  # type: ignore[index]
        assert _kinds(world.records(revision))[-1] == "CanaryStarted"  # no advance, no promotion
    finally:
        world.fault(metrics_down=False)  # the source comes back: the canary goes on
        runner.join(120)
    assert done
    assert done[0].revisions.stable == revision
    assert _kinds(world.records(revision))[-1] == "Promoted"


def _in_canary(state: LocalState, revision: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = state.status()
        if status and status.revisions.candidate == revision and status.canary.step == 0:
            return
        time.sleep(0.2)
    pytest.fail(f"{revision} did not reach its canary")


def test_abort_retry_and_promote_by_hand_with_autoglm_rollout(world: World) -> None:
    slow = {**ROLLOUT, "steps": [{"weight": 50, "pause": "10m"}, {"weight": 100}]}
    revision = world.edit(samples=10, rollout=slow)
    state_dir = world.loop.options.state_dir
    state = LocalState(state_dir)

    def rollout(command: str, *args: str) -> Any:
        extra = {"status": [], "history": ["--db", world.audit]}.get(
            command, ["--db", world.audit, "--wait", "60"]
        )
        return CliRunner().invoke(
            cli, ["rollout", command, "tiny", "--state-dir", str(state_dir), *extra, *args]
        )

    def start() -> tuple[threading.Thread, list[AutoGLMModelStatus]]:
        done: list[AutoGLMModelStatus] = []
        thread = threading.Thread(target=lambda: done.append(world.loop.run()))
        thread.start()
        return thread, done

    runner, done = start()
    _in_canary(state, revision)
    shown = rollout("status")
    assert shown.exit_code == 0, shown.output
    assert "phase: RollingOut" in shown.output
    assert "loop: running" in shown.output
    assert f"candidate: {revision}" in shown.output
    aborted = rollout("abort", "--actor", "user:alice")
    runner.join(60)
    assert aborted.exit_code == 0, aborted.output
    assert "user:alice  RolledBack" in aborted.output  # the ledger's row, as the command prints it
    assert done[0].revisions.rejected == revision

    queued = rollout("retry", "--actor", "user:bob")  # the loop is stopped: queued for its next run
    assert queued.exit_code == 0, queued.output
    assert "queued" in queued.output
    runner, done = start()
    _in_canary(state, revision)  # built again (unchanged steps reused) and canaried again
    refused = rollout("retry", "--actor", "user:bob")
    assert refused.exit_code != 0
    assert "not the rejected revision" in refused.output
    promoted = rollout("promote", "--actor", "user:carol")
    runner.join(60)
    assert promoted.exit_code == 0, promoted.output
    assert done[0].revisions.stable == revision

    records = world.records(revision)
    overrides = [(r["actor"], r["evidence"]["intent"]) for r in records if r["decision"] == "ManualOverride"]
    assert overrides == [("user:alice", "abort"), ("user:bob", "retry"), ("user:carol", "promote")]
    assert _kinds(records).count("CanaryStarted") == 2  # one per attempt, each recorded once
    assert [r["actor"] for r in records if r["decision"] in ("RolledBack", "Promoted")] == [
        "user:alice",
        "user:carol",
    ]
    history = rollout("history")
    assert "user:carol" in history.output
    assert "ManualOverride" in history.output
    wrong = CliRunner().invoke(cli, ["rollout", "status", "other", "--state-dir", str(state_dir)])
    assert wrong.exit_code != 0
    assert "holds the rollout of ml/tiny, not other" in wrong.output


@pytest.mark.e2e  # slow (35-55 s): make test-e2e, keeping make test under 15 minutes
def test_killing_autoglm_run_mid_canary_resumes_at_the_same_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = isolated_loop_env(tmp_path, monkeypatch)
    source = tiny_glm(tmp_path / "glm", init_std=0.3, seed=3)
    slow = {**ROLLOUT, "steps": [{"weight": 50, "pause": "30s"}, {"weight": 100, "pause": "2s"}]}
    # 300Mi cannot hold the source beside the candidate: the first rollout goes on its offline gates
    small = [{"name": "local", "engine": "torch", "resources": {"memory": "300Mi"}}]
    path = manifest(tmp_path, source, rollout=slow, targets=small)
    command = [sys.executable, "-m", "autoglm_operator", "run", str(path), "--state-dir", str(tmp_path / "state"),
               "--traffic", "8", "--decode-tokens", "4", "--timeout", "300"]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "first rollout: offline gates alone: the target cannot hold the source" in first.stderr
    path = manifest(
        tmp_path, source, rollout=slow, targets=small, calibration={"samples": 5, "sequenceLength": 64}
    )
    revision = rollout_revision(load_manifest(str(path)).spec)
    state = LocalState(tmp_path / "state")
    killed = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _in_canary(state, revision, timeout=240)
        time.sleep(2)  # mid-step
        orphan = state.servers()["local"]["pid"]
        os.kill(killed.pid, signal.SIGKILL)  # no clean-up at all: the server is left running
        killed.wait(30)
    finally:
        if killed.poll() is None:
            killed.kill()
    before = state.status()
    assert before is not None
    assert (before.canary.step, before.canary.weight) == (0, 50)
    started = json.loads((tmp_path / "state/pipelines" / revision / "work/publish/STEP.json").read_text())
    fast = manifest(
        tmp_path, source, rollout=ROLLOUT, targets=small, calibration={"samples": 5, "sequenceLength": 64}
    )
    assert rollout_revision(load_manifest(str(fast)).spec) == revision  # rollout is not in the revision
    resumed = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "a killed loop left running" in resumed.stderr
    assert orphan is not None
    with pytest.raises(ProcessLookupError):
        os.kill(orphan, 0)  # the orphaned server was stopped
    after = state.status()
    assert after is not None
    assert after.revisions.stable == revision
    again = json.loads((tmp_path / "state/pipelines" / revision / "work/publish/STEP.json").read_text())
    assert again["startedAt"] == started["startedAt"]  # not built twice
    result = CliRunner().invoke(cli, ["audit", "--db", audit, "query", "--model", "ml/tiny",
                                      "--revision", revision, "-o", "json"])  # fmt: skip
    kinds = promoted_kinds([r["decision"] for r in json.loads(result.output)], FAILURE_LIMIT)
    assert kinds == ["PipelineStarted", "GatePassed", "CanaryStarted", "CanaryAdvanced", "Promoted"]
