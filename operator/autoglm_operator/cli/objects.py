"""``autoglm objects``: every object the operator creates for a manifest (``autoglm_operator.kube``).
The kube builders (kserve, kubernetes and Hera models) are imported when the command runs, so the
CLI starts without them."""

from __future__ import annotations

from pathlib import Path

import click

from autoglm_operator.kube import DEFAULT_ARTIFACT_URI


@click.command("objects", short_help="Print the Kubernetes objects the operator creates for a manifest.")
@click.argument("manifest")
@click.option(
    "--image",
    default=None,
    help="The AutoGLM image the objects run (default: the pipeline's, autoglm:0.1.0).",
)
@click.option("--artifact-uri", default=DEFAULT_ARTIFACT_URI, show_default=True,
              help="Where a published revision lies: {namespace}, {model} and {revision} are filled in.")  # fmt: skip
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the YAML stream here instead of stdout.")  # fmt: skip
def objects_command(manifest: str, image: str | None, artifact_uri: str, output: Path | None) -> None:
    """Print what the operator creates for MANIFEST (- reads stdin): the WorkflowTemplate, the first
    Workflow, and per target its InferenceService and agents' ConfigMap, then the ClusterServingRuntimes."""
    from autoglm_operator.kube.render import render_yaml
    from autoglm_pipelines.cli import load_manifest
    from autoglm_pipelines.workflow import DEFAULT_IMAGE

    model = load_manifest(manifest)
    text = render_yaml(model, image=image or DEFAULT_IMAGE, artifact_uri=artifact_uri)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
