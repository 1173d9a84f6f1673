"""Run a pipeline on this machine: the same steps as the Argo WorkflowTemplate, as subprocesses.

Each step is ``python -m autoglm_pipelines STEP --spec WORKDIR/spec.yaml --workdir WORKDIR``
(so a crash or an out-of-memory kill in one step cannot take the runner down), in the order of
``dag.pipeline_steps``. Steps whose inputs are unchanged skip themselves, so re-running after an
interruption resumes where it stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from autoglm_api.resource import AutoGLMModel
from autoglm_pipelines.dag import pipeline_steps
from autoglm_pipelines.results import StepResult, read_result

SPEC_FILE = "spec.yaml"


@dataclass
class LocalRun:
    succeeded: bool
    published: Path | None = None
    #: Step name -> "Succeeded", "Reused", "Failed: reason" or "Not run".
    steps: dict[str, str] = field(default_factory=dict)


def run_local(
    model: AutoGLMModel,
    workdir: Path,
    *,
    extra_args: list[str] | None = None,
    console: Console | None = None,
) -> LocalRun:
    """Run every step of ``model``'s pipeline in ``workdir``; stop at the first failure."""
    console = console or Console(stderr=True)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file = workdir / SPEC_FILE
    spec_file.write_text(yaml.safe_dump(model.to_json(), sort_keys=False))  # validated, defaults filled in
    steps = pipeline_steps(model.spec)
    run = LocalRun(succeeded=False, steps={s.name: "Not run" for s in steps})
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        for step in steps:
            task = progress.add_task(f"{step.name}: running", total=1)
            command = [
                sys.executable, "-m", "autoglm_pipelines", step.name,
                "--spec", str(spec_file), "--workdir", str(workdir), *(extra_args or []),
            ]  # fmt: skip
            before = read_result(workdir / step.name)
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            elapsed = time.perf_counter() - started
            if done.returncode != 0:
                reason = _last_line(done.stderr) or f"exit status {done.returncode}"
                run.steps[step.name] = f"Failed: {reason}"
                progress.update(task, completed=1, description=f"[red]{step.name}: {reason}")
                return run
            reused = _reused(before, read_result(workdir / step.name))
            run.steps[step.name] = "Reused" if reused else "Succeeded"
            note = "unchanged, skipped" if reused else f"done in {elapsed:.1f}s"
            progress.update(task, completed=1, description=f"[green]{step.name}: {note}")
    run.succeeded = True
    run.published = _published(workdir)
    return run


def _reused(before: StepResult | None, after: StepResult | None) -> bool:
    """Whether the step skipped itself: its STEP.json is the same success it was before it ran."""
    return (
        before is not None
        and after is not None
        and after.status == "Succeeded"
        and (after.started_at, after.inputs_digest) == (before.started_at, before.inputs_digest)
    )


def _published(workdir: Path) -> Path | None:
    try:
        result = json.loads((workdir / "publish" / "STEP.json").read_text())
        return Path(result["metrics"]["artifact"])
    except (OSError, ValueError, KeyError):
        return None


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
