"""``autoglm pipeline ...``: the compression pipeline of one AutoGLMModel manifest.

``render`` prints the Argo WorkflowTemplate that runs the pipeline in a cluster. Every subcommand
reads its manifest with :func:`load_manifest`, so a bad manifest ends the same way everywhere: one
line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from autoglm_api.resource import AutoGLMModel
from autoglm_api.validation import UnreadableManifestError, read_source, validate_text

if TYPE_CHECKING:
    from autoglm_pipelines.steps import StepContext

EXIT_BAD_MANIFEST = 2


class ManifestError(click.ClickException):
    """The manifest cannot be read or is not exactly one valid AutoGLMModel (one line, exit status 2)."""

    exit_code = EXIT_BAD_MANIFEST


def load_manifest(source: str) -> AutoGLMModel:
    """The one AutoGLMModel in file ``source`` (``-`` for stdin), validated as the API server would."""
    label = "<stdin>" if source == "-" else source
    try:
        results = validate_text(read_source(source))
    except UnreadableManifestError as exc:
        raise ManifestError(f"{label}: {exc}") from exc
    models = [r for r in results if not r.skipped]
    if len(models) != 1:
        raise ManifestError(f"{label}: expected one AutoGLMModel document, found {len(models)}")
    (result,) = models
    if result.problems or result.model is None:
        problems = "; ".join(str(p) for p in result.problems) or "not an AutoGLMModel"
        raise ManifestError(f"{label}: invalid AutoGLMModel: {problems}")
    return result.model


@click.group("pipeline")
def pipeline_group() -> None:
    """Compress, calibrate, validate and publish a model: the pipeline of one AutoGLMModel manifest."""


@pipeline_group.command("render", short_help="Print the Argo WorkflowTemplate of a manifest.")
@click.argument("manifest", metavar="MANIFEST")
@click.option(
    "--image",
    default=None,
    metavar="IMAGE",
    help="Container image that runs the steps. Default: this release's autoglm image.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the YAML to this file instead of printing it.",
)
def render_command(manifest: str, image: str | None, output: Path | None) -> None:
    """Print the Argo WorkflowTemplate of MANIFEST's pipeline (- reads stdin).

    One container step per pipeline step, artifacts passed between them, retries with backoff,
    deadlines and resource requests, labelled with the model and its artifact revision. Exit
    status 2 when the manifest cannot be read or is invalid.
    """
    # Imported here: Hera is slow to import and changes how PyYAML writes strings process-wide,
    # which other commands should not inherit.
    from autoglm_pipelines.workflow import DEFAULT_IMAGE, render_yaml

    model = load_manifest(manifest)
    try:
        text = render_yaml(model, image=image or DEFAULT_IMAGE)
    except ValueError as exc:
        raise ManifestError(f"{manifest}: {exc}") from exc
    if output is None:
        click.echo(text, nl=False)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    click.echo(f"wrote {output}", err=True)


CACHE_ENV = "AUTOGLM_CACHE_DIR"
DEFAULT_CACHE = ".cache/autoglm"
STEP_NAMES = ("fetch", "search", "compress", "calibrate", "validate", "publish")


def _run_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options every step and ``run`` share."""
    options = [
        click.option(
            "--workdir",
            required=True,
            type=click.Path(file_okay=False, path_type=Path),
            help="Pipeline folder: each step reads its inputs' subfolders and writes its own.",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help=f"Cache for converted checkpoints and downloads. Default: ${CACHE_ENV}, else {DEFAULT_CACHE}.",
        ),
        click.option(
            "--decode-tokens",
            type=click.IntRange(2, 4096),
            default=128,
            show_default=True,
            help="New tokens per decode measurement (validate).",
        ),
        click.option(
            "--output",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Where publish writes the artifact. Default: WORKDIR/publish/model.",
        ),
        click.option("--threads", type=click.IntRange(1, 256), default=None, help="Torch CPU threads."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _step_options(command: Callable[..., None]) -> Callable[..., None]:
    spec = click.option(
        "--spec", "manifest", required=True, metavar="MANIFEST", help="The AutoGLMModel manifest."
    )
    return spec(_run_options(command))


def _context(workdir: Path, cache_dir: Path | None, decode_tokens: int, output: Path | None) -> StepContext:
    from autoglm_pipelines.steps import StepContext

    cache = cache_dir or Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE))
    return StepContext(workdir=workdir, cache_dir=cache, decode_tokens=decode_tokens, output=output)


def _make_step_command(step: str) -> click.Command:
    @_step_options
    def command(
        manifest: str,
        workdir: Path,
        cache_dir: Path | None,
        decode_tokens: int,
        output: Path | None,
        threads: int | None,
    ) -> None:
        from autoglm_pipelines.resume import reusable

        model = load_manifest(manifest)
        earlier = reusable(model, step, workdir, decode_tokens=decode_tokens, output=output)
        if earlier is not None:  # decided before torch is imported: a skipped step costs well under a second
            click.echo(f"{step}: {earlier.status} earlier (inputs unchanged: reused)")
            return
        from autoglm_pipelines.dag import EXIT_TRANSIENT
        from autoglm_pipelines.steps import StepFailedError, run_step

        if threads:
            torch_threads(threads)
        try:
            result, reused = run_step(model, step, _context(workdir, cache_dir, decode_tokens, output))
        except StepFailedError as exc:
            click.echo(
                f"{step}: failed{' (transient: may succeed if retried)' if exc.transient else ''}: {exc}",
                err=True,
            )
            sys.exit(EXIT_TRANSIENT if exc.transient else 1)
        note = " (inputs unchanged: reused)" if reused else ""
        click.echo(f"{step}: {result.status} in {result.duration_seconds:.1f}s{note}")

    from autoglm_pipelines.dag import CALIBRATE, COMPRESS, FETCH, PUBLISH, SEARCH, VALIDATE

    description = {s.name: s.description for s in (FETCH, SEARCH, COMPRESS, CALIBRATE, VALIDATE, PUBLISH)}[
        step
    ]
    return click.command(step, help=f"{description}. Writes WORKDIR/{step}/ and its STEP.json.")(command)


def torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


for _name in STEP_NAMES:
    pipeline_group.add_command(_make_step_command(_name))


@pipeline_group.command("run")
@click.argument("manifest", metavar="MANIFEST")
@_run_options
@click.option(
    "--audit/--no-audit",
    default=True,
    show_default=True,
    help="Record the gates' verdict in the audit ledger ($AUTOGLM_AUDIT_URL, else sqlite:///.autoglm/audit.db).",
)
def run_command(
    manifest: str,
    workdir: Path,
    cache_dir: Path | None,
    decode_tokens: int,
    output: Path | None,
    threads: int | None,
    audit: bool,
) -> None:
    """Run MANIFEST's whole pipeline here, each step as its own process, in dependency order.

    Steps that already succeeded for the same inputs are skipped, so a run resumes where an
    interrupted one stopped. Exit 0 only when every step succeeded, every gate included.
    """
    from autoglm_pipelines.executor import run_local

    model = load_manifest(manifest)
    extra = ["--decode-tokens", str(decode_tokens)]
    if cache_dir:
        extra += ["--cache-dir", str(cache_dir)]
    if output:
        extra += ["--output", str(output)]
    if threads:
        extra += ["--threads", str(threads)]
    outcome = run_local(model, workdir, extra_args=extra)
    if audit:
        _record_verdict(model, workdir, decode_tokens, output)
    if not outcome.succeeded:
        sys.exit(1)
    click.echo(f"published: {outcome.published}")


class VerdictNotRecordedError(click.ClickException):
    """The gates' verdict could not be written to the audit ledger: the run fails (one line, exit 1)."""


def _record_verdict(model: AutoGLMModel, workdir: Path, decode_tokens: int, output: Path | None) -> None:
    """Append GatePassed or GateFailed, with the gates and figures as evidence, when validate reported.

    The record is keyed by the revision and validate's inputs, so a re-run that reuses validate finds
    the verdict already recorded instead of recording it again.
    """
    import hashlib
    import json

    from autoglm_operator.audit import ACTOR_PIPELINE, GATE_FAILED, GATE_PASSED, Ledger
    from autoglm_operator.audit.ledger import LedgerError, resolve_url, safe_url
    from autoglm_pipelines.results import read_result
    from autoglm_pipelines.resume import inputs_digest
    from autoglm_pipelines.revision import artifact_revision

    # Only a verdict on this spec's inputs: a report left by an earlier run is not this run's.
    done = read_result(workdir / "validate")
    current = inputs_digest(model, "validate", workdir, decode_tokens=decode_tokens, output=output)
    if done is None or done.inputs_digest != current:
        return
    try:
        report = json.loads((workdir / "validate" / "validate.json").read_text())
    except (OSError, ValueError):
        return  # the pipeline stopped before validate: no gate verdict to record
    failed = [g for g in report["gates"] if not g["passed"]]
    reason = "all gates passed" if not failed else "gate failed: " + ", ".join(g["name"] for g in failed)
    evidence = {
        "gates": report["gates"],
        "qualityLoss": report["qualityLoss"],
        "sizeReduction": report["sizeReduction"],
        "decodeSpeedup": report.get("decodeSpeedup"),
        "report": str(workdir / "validate" / "validate.json"),
    }
    namespace, name = model.metadata.namespace or "default", model.metadata.name or ""
    revision = artifact_revision(model.spec)
    verdict_of = json.dumps([namespace, name, revision, current]).encode()
    key = f"verdict:{revision[:64]}:{hashlib.sha256(verdict_of).hexdigest()}"
    url = resolve_url(None, os.environ)
    try:
        with Ledger(url) as ledger:
            record = ledger.append(
                namespace,
                name,
                GATE_FAILED if failed else GATE_PASSED,
                reason,
                revision=revision,
                actor=ACTOR_PIPELINE,
                evidence=evidence,
                idempotency_key=key,
            )
    except (LedgerError, ValueError) as exc:
        raise VerdictNotRecordedError(
            f"the gates' verdict was not recorded in the audit ledger ({safe_url(url)}): {exc}; "
            "fix the ledger and run again (finished steps are reused)"
        ) from exc
    click.echo(
        f"audit: {record.decision} is seq {record.seq} ({record.id}) for revision {revision}", err=True
    )
