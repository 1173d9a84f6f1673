"""``autoglm pipeline ...``: the compression pipeline of one AutoGLMModel manifest.

``render`` prints the Argo WorkflowTemplate that runs the pipeline in a cluster. Every subcommand
reads its manifest with :func:`load_manifest`, so a bad manifest ends the same way everywhere: one
line on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from autoglm_api.resource import AutoGLMModel
from autoglm_api.validation import UnreadableManifestError, validate_text

EXIT_BAD_MANIFEST = 2


class ManifestError(click.ClickException):
    """The manifest cannot be read or is not exactly one valid AutoGLMModel (one line, exit status 2)."""

    exit_code = EXIT_BAD_MANIFEST


def _read_text(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableManifestError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise UnreadableManifestError(f"cannot read: {exc.strerror or exc}") from exc


def load_manifest(source: str) -> AutoGLMModel:
    """The one AutoGLMModel in file ``source`` (``-`` for stdin), validated as the API server would."""
    label = "<stdin>" if source == "-" else source
    try:
        results = validate_text(_read_text(source))
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
