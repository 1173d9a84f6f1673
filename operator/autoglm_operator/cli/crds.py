"""``autoglm crds``: render the CustomResourceDefinition from the API models."""

from __future__ import annotations

from pathlib import Path

import click

from autoglm_api.crd import render_crd_yaml


@click.command("crds")
@click.option(
    "-o",
    "--output",
    "outputs",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the CRD to this file (repeatable). Default: print it.",
)
def crds_command(outputs: tuple[Path, ...]) -> None:
    """Render the AutoGLMModel CRD (apiextensions.k8s.io/v1) from the pydantic models."""
    text = render_crd_yaml()
    if not outputs:
        click.echo(text, nl=False)
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        click.echo(f"wrote {path}", err=True)
