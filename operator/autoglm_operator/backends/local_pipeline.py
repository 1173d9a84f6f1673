"""The pipeline backend of the embedded loop: one ``autoglm pipeline run`` process per revision, in
``ROOT/REVISION/``, observed through the steps' ``STEP.json`` files.

``start(model, action)`` is idempotent: a revision whose run is alive, or whose run already
published, is not started again (a restart of the loop never builds twice); a retry (a higher
``attempt``) starts over in the same folder, where unchanged steps are reused. ``observe(revision)``
gives the core's :class:`~autoglm_operator.plan.PipelineRun`. A first rollout's run also publishes
the uncompressed source as the canary's baseline (``--publish-baseline``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from autoglm_api.resource import AutoGLMModel
from autoglm_api.validation import load_manifest
from autoglm_core.errors import AutoGLMError
from autoglm_core.variants import variants
from autoglm_operator.plan import Action, PipelineRun, Published
from autoglm_pipelines.dag import pipeline_steps, step_name

PID_FILE = "pipeline.pid"
ATTEMPT_FILE = "attempt"
LOG_FILE = "pipeline.log"
SPEC_FILE = "spec.yaml"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child has exited: reap it
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True  # not our child: it exists


class LocalPipelines:
    def __init__(self, root: Path, *, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        """``env``: variables set for the runs on top of this process's environment."""
        self.root = root
        self.extra_args = extra_args
        self.env = env
        #: The runs this process started (a restarted loop finds the others by their pid files).
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        #: Each run's parsed manifest, with the version of its file it was parsed from.
        self._specs: dict[str, tuple[int, AutoGLMModel | None]] = {}

    def _running(self, revision: str) -> bool:
        process = self._processes.get(revision)
        if process is not None:
            return process.poll() is None
        pid = self._pid(revision)
        return pid is not None and _alive(pid)

    def close(self) -> None:
        """Stop the runs this process started (the loop is stopping; a restart reuses their steps)."""
        for process in self._processes.values():
            if process.poll() is None:
                process.terminate()
                process.wait(30)
        self._processes.clear()

    def folder(self, revision: str) -> Path:
        return self.root / revision

    def _pid(self, revision: str) -> int | None:
        try:
            return int((self.folder(revision) / PID_FILE).read_text())
        except (OSError, ValueError):
            return None

    def _attempt(self, revision: str) -> int:
        try:
            return int((self.folder(revision) / ATTEMPT_FILE).read_text())
        except (OSError, ValueError):
            return 0

    def start(self, model: AutoGLMModel, action: Action) -> None:
        revision, attempt = action.revision, action.attempt or 1
        folder = self.folder(revision)
        if self._running(revision):
            return
        current = self.observe(revision)
        if current is not None and attempt <= self._attempt(revision):
            return  # this attempt ran already (or is done): never twice
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SPEC_FILE).write_text(yaml.safe_dump(model.to_json(), sort_keys=False))
        command = [
            sys.executable, "-m", "autoglm_operator", "pipeline", "run", str(folder / SPEC_FILE),
            "--workdir", str(folder / "work"), *self.extra_args,
            *(["--publish-baseline"] if action.baseline else []),
        ]  # fmt: skip
        with (folder / LOG_FILE).open("a") as log:
            env = {**os.environ, **(self.env or {})}  # the environment of now, plus ours
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._processes[revision] = process
        (folder / PID_FILE).write_text(str(process.pid))
        (folder / ATTEMPT_FILE).write_text(str(attempt))

    def _spec(self, revision: str) -> AutoGLMModel | None:
        """The manifest the run was started with, parsed once per version of its file (observe runs
        every tick and would otherwise validate it again each time)."""
        path = self.folder(revision) / SPEC_FILE
        try:
            version = path.stat().st_mtime_ns
        except OSError:
            return None
        cached = self._specs.get(revision)
        if cached is None or cached[0] != version:
            try:
                model: AutoGLMModel | None = load_manifest(str(path))
            except (OSError, ValueError, AutoGLMError):
                model = None
            cached = self._specs[revision] = (version, model)
        return cached[1]

    def _variants(self, revision: str) -> list[str]:
        """The variants the run builds ("" for the spec's own; a precision, or a precision and an
        engine, for the others)."""
        model = self._spec(revision)
        return [v.name for v in variants(model.spec)] if model is not None else [""]

    def _steps(self, revision: str) -> list[str]:
        model = self._spec(revision)
        if model is None:
            return ["fetch", "calibrate", "search", "compress", "validate", "publish"]
        return [s.name for s in pipeline_steps(model.spec)]

    def artifact(self, revision: str) -> str | None:
        """Where ``revision`` was published: a run's own artifact, a target precision's variant of
        some run, or a source published as the baseline by some run (``src-...``)."""
        run = self.observe(revision)
        if run is not None and run.artifact_uri:
            return run.artifact_uri
        for step in sorted(self.root.glob("*/work/publish*/STEP.json")):
            result = _json(step) or {}
            metrics = result.get("metrics", {})
            if result.get("status") != "Succeeded":
                continue
            if metrics.get("revision") == revision and metrics.get("artifact"):
                return str(metrics["artifact"])
            if metrics.get("baselineRevision") == revision and metrics.get("baseline"):
                return str(metrics["baseline"])
        return None

    def observe(self, revision: str) -> PipelineRun | None:
        folder = self.folder(revision)
        if not folder.is_dir():
            return None
        attempt = max(self._attempt(revision), 1)
        if self._running(revision):
            return PipelineRun(revision, "Running", attempt=attempt)
        work = folder / "work"
        names = self._variants(revision)
        published = {name: _result(work / step_name("publish", name)) for name in names}
        if all(r is not None and r.get("status") == "Succeeded" for r in published.values()):
            metrics = (published.get(names[0]) or {}).get("metrics", {})  # the first variant's
            baseline = metrics.get("baseline")
            built = tuple(
                Published(str(r["metrics"].get("revision", "")), str(r["metrics"]["artifact"]),
                          r["metrics"].get("artifactBytes"))
                for r in published.values() if r is not None
            )  # fmt: skip
            return PipelineRun(
                revision, "Succeeded", gates_passed=True, artifact_uri=str(metrics.get("artifact", "")),
                attempt=attempt, artifact_bytes=metrics.get("artifactBytes"),
                baseline=Published(str(metrics["baselineRevision"]), str(baseline), metrics.get("baselineBytes"))
                if baseline and metrics.get("baselineRevision") else None,
                variants=built,
            )  # fmt: skip
        for name in names:  # one variant's gate failed: the whole rollout's verdict
            report = _json(work / step_name("validate", name) / "validate.json")
            if report is not None and report.get("passed") is False:
                failed = [g["name"] for g in report.get("gates", []) if not g.get("passed")]
                variant = f" (variant {name})" if name else ""
                return PipelineRun(
                    revision,
                    "Succeeded",
                    gates_passed=False,
                    reason=f"gate failed{variant}: " + ", ".join(failed),
                    attempt=attempt,
                )
        for step in self._steps(revision):
            result = _result(work / step)
            if result is not None and result.get("status") == "Failed":
                return PipelineRun(
                    revision, "Failed", reason=f"{step}: {result.get('reason', '')}", attempt=attempt
                )
        tail = _tail(folder / LOG_FILE)
        return PipelineRun(
            revision, "Failed", reason=f"the pipeline process ended without a result: {tail}", attempt=attempt
        )


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _result(step: Path) -> dict[str, Any] | None:
    return _json(step / "STEP.json")


def _tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"
