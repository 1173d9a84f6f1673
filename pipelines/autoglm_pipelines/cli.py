"""``autoglm pipeline ...`` (also ``python -m autoglm_pipelines``): the compression pipeline of one
AutoGLMModel manifest.

``render`` prints the Argo WorkflowTemplate that runs the pipeline in a cluster. Every subcommand
reads its manifest with :func:`load_manifest`, so a bad manifest ends the same way everywhere: one
line on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from autoglm_api import validation
from autoglm_api.resource import AutoGLMModel
from autoglm_core.paths import CACHE_ENV, DEFAULT_CACHE_DIR
from autoglm_core.paths import cache_dir as resolve_cache_dir

if TYPE_CHECKING:
    from autoglm_pipelines.steps import StepContext

EXIT_BAD_MANIFEST = 2


class ManifestError(click.ClickException):
    """The manifest cannot be read or is not exactly one valid AutoGLMModel (one line, exit status 2)."""

    exit_code = EXIT_BAD_MANIFEST


def load_manifest(source: str) -> AutoGLMModel:
    """:func:`autoglm_api.validation.load_manifest`, its error as the CLI reports it."""
    try:
        return validation.load_manifest(source)
    except validation.ManifestError as exc:
        raise ManifestError(str(exc)) from exc


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


STEP_NAMES = ("fetch", "finetune", "search", "compress", "calibrate", "validate", "publish")


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
            help=f"Cache for converted checkpoints and downloads. Default: ${CACHE_ENV}, else {DEFAULT_CACHE_DIR}.",
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
        click.option(
            "--publish-baseline",
            is_flag=True,
            help="Publish the uncompressed source too (next to the artifact, in baseline/), with its own "
            "model card: what a first rollout's candidate is canaried against.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _step_options(command: Callable[..., None]) -> Callable[..., None]:
    spec = click.option(
        "--spec", "manifest", required=True, metavar="MANIFEST", help="The AutoGLMModel manifest."
    )
    variant = click.option(
        "--variant",
        default="",
        metavar="VARIANT",
        help="For compress, validate and publish: the variant a target's precision (and engine) asks for, "
        "e.g. int4 or int8-gguf (its folders are STEP-VARIANT). Default: the spec's own compression.",
    )
    return variant(spec(_run_options(command)))


def _context(
    workdir: Path, cache: Path | None, decode_tokens: int, output: Path | None, baseline: bool
) -> StepContext:
    from autoglm_pipelines.steps import StepContext

    return StepContext(
        workdir=workdir, cache_dir=resolve_cache_dir(cache), decode_tokens=decode_tokens, output=output,
        baseline=baseline,
    )  # fmt: skip


def _make_step_command(step: str) -> click.Command:
    @_step_options
    def command(
        manifest: str,
        workdir: Path,
        cache_dir: Path | None,
        decode_tokens: int,
        output: Path | None,
        threads: int | None,
        publish_baseline: bool,
        variant: str,
    ) -> None:
        from autoglm_pipelines.dag import find_step
        from autoglm_pipelines.dag import step_name as name_of
        from autoglm_pipelines.resume import reusable

        model = load_manifest(manifest)
        name = name_of(step, variant)
        try:
            find_step(model.spec, name)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        earlier = reusable(
            model, name, workdir, decode_tokens=decode_tokens, output=output, baseline=publish_baseline
        )
        if earlier is not None:  # decided before torch is imported: a skipped step costs well under a second
            click.echo(f"{name}: {earlier.status} earlier (inputs unchanged: reused)")
            return
        from autoglm_pipelines.dag import EXIT_TRANSIENT
        from autoglm_pipelines.steps import StepFailedError, run_step

        if threads:
            torch_threads(threads)
        try:
            result, reused = run_step(
                model, name, _context(workdir, cache_dir, decode_tokens, output, publish_baseline)
            )
        except StepFailedError as exc:
            click.echo(
                f"{name}: failed{' (transient: may succeed if retried)' if exc.transient else ''}: {exc}",
                err=True,
            )
            sys.exit(EXIT_TRANSIENT if exc.transient else 1)
        note = " (inputs unchanged: reused)" if reused else ""
        click.echo(f"{name}: {result.status} in {result.duration_seconds:.1f}s{note}")

    from autoglm_pipelines.dag import CALIBRATE, COMPRESS, FETCH, FINETUNE, PUBLISH, SEARCH, VALIDATE

    description = {
        s.name: s.description for s in (FETCH, FINETUNE, SEARCH, COMPRESS, CALIBRATE, VALIDATE, PUBLISH)
    }[step]
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
    publish_baseline: bool,
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
    if publish_baseline:
        extra += ["--publish-baseline"]
    outcome = run_local(model, workdir, extra_args=extra)
    if audit:
        _record_verdict(model, workdir, decode_tokens, output)
    if not outcome.succeeded:
        sys.exit(1)
    click.echo(f"published: {outcome.published}")


def _record_verdict(model: AutoGLMModel, workdir: Path, decode_tokens: int, output: Path | None) -> None:
    """Each variant's gates' verdict (those validate reported on) in the ledger."""
    from autoglm_core.variants import variants
    from autoglm_pipelines.verdicts import VerdictNotRecordedError, record_verdict

    for variant in variants(model.spec):
        try:
            record = record_verdict(
                model, workdir, decode_tokens=decode_tokens, output=output, variant=variant.name
            )
        except VerdictNotRecordedError as exc:
            raise click.ClickException(str(exc)) from exc
        if record is not None:
            click.echo(
                f"audit: {record.decision} is seq {record.seq} ({record.id}) for revision {record.revision}",
                err=True,
            )


def main() -> None:
    """``python -m autoglm_pipelines``: the pipeline's commands alone (what the local runner starts)."""
    pipeline_group(prog_name="python -m autoglm_pipelines")
