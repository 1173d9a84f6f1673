"""``autoglm run MANIFEST``: the closed loop on this machine (pipeline, server, canary, ledger)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("run")
@click.argument("manifest", metavar="MANIFEST", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".autoglm/run"),
              show_default=True, help="Pipelines, the server's log, the saved status and the audit ledger.")  # fmt: skip
@click.option("--until", type=click.Choice(["serving", "promoted"]), default="promoted", show_default=True,
              help="Stop once something serves, or once the manifest's revision is promoted (or rejected).")  # fmt: skip
@click.option("--traffic", "traffic_rate", type=click.FloatRange(0, 100), default=2.0, show_default=True,
              help="Demo requests per second during a canary, so it has data to judge; 0 when real clients send it.")  # fmt: skip
@click.option("--timeout", "timeout_seconds", type=click.FloatRange(1), default=1800.0, show_default=True)
@click.option("--decode-tokens", type=click.IntRange(2, 4096), default=32, show_default=True,
              help="New tokens per decode measurement in validate.")  # fmt: skip
def run_command(
    manifest: Path,
    state_dir: Path,
    until: str,
    traffic_rate: float,
    timeout_seconds: float,
    decode_tokens: int,
) -> None:
    """Run MANIFEST's rollout here: build the revision, validate it, serve it, canary it against stable
    and promote or roll back, recording every decision in the audit ledger (STATE_DIR/audit.db).

    Running again resumes from the saved status; editing the manifest rolls out the change.
    """
    from autoglm_operator.embedded import EmbeddedLoop, LoopOptions

    options = LoopOptions(
        state_dir=state_dir,
        until=until,  # type: ignore[arg-type]
        traffic_rate=traffic_rate,
        timeout_seconds=timeout_seconds,
        pipeline_args=("--decode-tokens", str(decode_tokens)),
        log=lambda line: click.echo(line, err=True),
    )
    loop = EmbeddedLoop(manifest, options)
    try:
        status = loop.run()
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        url = loop.server.url if loop.server else None
        loop.close()
    revisions = status.revisions
    click.echo(f"phase {status.phase}: stable {revisions.stable}, rejected {revisions.rejected}")
    if url:
        click.echo(f"served at {url} until this command ended")
