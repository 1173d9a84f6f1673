"""Run a pipeline on this machine: the same steps as the Argo WorkflowTemplate, each its own process.

Each step is ``autoglm_pipelines STEP --spec WORKDIR/spec.yaml --workdir WORKDIR`` in a child
process (so a crash or an out-of-memory kill in one step cannot take the runner down), in the order
of ``dag.pipeline_steps``. Steps whose inputs are unchanged skip themselves, so re-running after an
interruption resumes where it stopped.

The children are forked from a ``multiprocessing`` fork server that imported torch, transformers
and the steps once: a fresh ``python -m autoglm_pipelines`` spends about 5 s importing them, which
was 90% of a tiny model's pipeline (27 s for five steps of under 0.6 s each). Each child gets the
runner's environment and working directory as they are when the step starts (the fork server's own
are those of when it was started). Where fork servers do not exist, steps run as plain subprocesses.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
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
            variant = ["--variant", step.variant] if step.variant else []
            args = [
                step.function,
                *variant,
                "--spec",
                str(spec_file),
                "--workdir",
                str(workdir),
                *(extra_args or []),
            ]
            before = read_result(workdir / step.name)
            started = time.perf_counter()
            returncode, stderr = run_step_process(args)
            elapsed = time.perf_counter() - started
            if returncode != 0:
                reason = _last_line(stderr) or f"exit status {returncode}"
                run.steps[step.name] = f"Failed: {reason}"
                progress.update(task, completed=1, description=f"[red]{step.name}: {reason}")
                return run
            reused = _reused(before, read_result(workdir / step.name))
            run.steps[step.name] = "Reused" if reused else "Succeeded"
            note = "unchanged, skipped" if reused else f"done in {elapsed:.1f}s"
            progress.update(task, completed=1, description=f"[green]{step.name}: {note}")
    run.succeeded = True
    first = next((s.name for s in steps if s.function == "publish"), "publish")  # the first variant's
    run.published = _published(workdir / first)
    return run


#: What the fork server imports once, so that no step pays for it.
PRELOAD = ("torch", "transformers", "autoglm_pipelines.cli", "autoglm_pipelines.steps")


def _child(args: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """A step in the forked child: the runner's environment and directory, output to the two files."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the child's whole life)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    from autoglm_pipelines.cli import pipeline_group

    pipeline_group.main(args=args, prog_name="autoglm_pipelines")  # exits with the step's status


def run_step_process(args: list[str]) -> tuple[int, str]:
    """Run ``autoglm_pipelines ARGS`` in its own process; its exit status and its stderr."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        done = subprocess.run(
            [sys.executable, "-m", "autoglm_pipelines", *args], capture_output=True, text=True, check=False
        )
        return done.returncode, done.stderr
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    with tempfile.TemporaryDirectory(prefix="autoglm-step-") as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        process = context.Process(
            target=_child, args=(args, dict(os.environ), os.getcwd(), out, err), name=f"autoglm-{args[0]}"
        )
        process.start()
        process.join()
        code = process.exitcode
        with open(err, errors="replace") as handle:
            stderr = handle.read()
    if code is None or code < 0:
        return 128 + abs(code or 9), stderr + f"\nthe step process was killed by signal {abs(code or 9)}"
    return code, stderr


def _reused(before: StepResult | None, after: StepResult | None) -> bool:
    """Whether the step skipped itself: its STEP.json is the same success it was before it ran."""
    return (
        before is not None
        and after is not None
        and after.status == "Succeeded"
        and (after.started_at, after.inputs_digest) == (before.started_at, before.inputs_digest)
    )


def _published(publish: Path) -> Path | None:
    try:
        result = json.loads((publish / "STEP.json").read_text())
        return Path(result["metrics"]["artifact"])
    except (OSError, ValueError, KeyError):
        return None


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
