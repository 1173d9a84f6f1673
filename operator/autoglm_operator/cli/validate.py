"""``autoglm validate FILE...``: check manifests as the API server would, every problem on its own line."""

from __future__ import annotations

import json
import sys

import click
import yaml

from autoglm_api.validation import DocumentResult, UnreadableManifestError, read_source, validate_text

EXIT_VALID, EXIT_INVALID, EXIT_UNREADABLE = 0, 1, 2


@click.command("validate")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option(
    "-o",
    "--output",
    type=click.Choice(["yaml", "json"]),
    default=None,
    help="Also print the valid objects with their defaults filled in (like a server-side dry run).",
)
@click.option("-q", "--quiet", is_flag=True, help="Print problems only, not a line per valid object.")
def validate_command(files: tuple[str, ...], output: str | None, quiet: bool) -> None:
    """Validate AutoGLMModel manifests (YAML, several documents per file, - for stdin).

    Checks the schema (types, enums, bounds, patterns, unknown fields) and the CEL rules of the
    CRD. Exit status: 0 all valid, 1 a manifest is invalid, 2 a file is unreadable or not YAML.
    """
    notes_to_stderr = output is not None  # keep stdout a clean YAML/JSON stream
    status = EXIT_VALID
    valid_objects = []
    for source in files:
        label = "<stdin>" if source == "-" else source
        try:
            results = validate_text(read_source(source))
        except UnreadableManifestError as exc:
            click.echo(f"{label}: {exc}", err=True)
            status = max(status, EXIT_UNREADABLE)
            continue
        if not results:
            click.echo(f"{label}: no documents", err=True)
            status = max(status, EXIT_INVALID)
        for result in results:
            where = f"{label}[{result.index + 1}]" if len(results) > 1 else label
            status = max(status, _report(where, result, quiet=quiet, err=notes_to_stderr))
            if result.valid and result.model is not None:
                valid_objects.append(result.model.to_json())
    if output == "json":
        # One object as itself, several as a List, as kubectl prints them.
        listed = {"apiVersion": "v1", "kind": "List", "items": valid_objects}
        click.echo(json.dumps(valid_objects[0] if len(valid_objects) == 1 else listed, indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump_all(valid_objects, sort_keys=False), nl=False)
    sys.exit(status)


def _report(where: str, result: DocumentResult, *, quiet: bool, err: bool) -> int:
    if result.skipped:
        if not quiet:
            click.echo(f"{where}: skipped: {result.skipped}", err=err)
        return EXIT_VALID
    for problem in result.problems:
        click.echo(f"{where}: {problem}", err=err)
    if result.problems:
        return EXIT_INVALID
    if not quiet:
        click.echo(f"{where}: AutoGLMModel {result.name} is valid", err=err)
    return EXIT_VALID
