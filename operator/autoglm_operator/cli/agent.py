"""``autoglm agent``: the sidecar beside each ``autoglm serve`` that swaps what it serves to what its
target's ConfigMap says (``autoglm_operator.agent``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from autoglm_core.paths import DEFAULT_CACHE_DIR
from autoglm_inference.options import ADMIN_TOKEN_ENV


@click.command("agent", short_help="Keep a local autoglm serve on the revisions its ConfigMap names.")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The desired state: the target's ConfigMap key desired.json, mounted as a file (re-read when it changes).")  # fmt: skip
@click.option("--server", default="http://127.0.0.1:8080", show_default=True,
              help="The server's base URL; its repository routes are called with the admin token.")  # fmt: skip
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_CACHE_DIR,
              show_default=True, help="The node's model cache: remote artifacts are pulled here (the server verifies them on load).")  # fmt: skip
@click.option("--admin-token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help=f"File holding the server's admin token; else ${ADMIN_TOKEN_ENV}; else none (a loopback server without one).")  # fmt: skip
@click.option("--status-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where each pass writes what the server serves and the last error (JSON).")  # fmt: skip
@click.option("--interval", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="Seconds between passes (a change of --config starts one at once).")  # fmt: skip
@click.option("--report-pod/--no-report-pod", default=True, show_default=True,
              help="Write each pass into the autoglm.io/served annotation of this pod (POD_NAME and POD_NAMESPACE "
                   "from the downward API; skipped outside a pod).")  # fmt: skip
@click.option("--once", is_flag=True, default=False, help="One pass, then exit: 0 when the server serves the desired state, 1 if not.")  # fmt: skip
def agent_command(
    config: Path,
    server: str,
    cache_dir: Path,
    admin_token_file: Path | None,
    status_file: Path | None,
    interval: float,
    report_pod: bool,
    once: bool,
) -> None:
    """Make the server at --server serve what --config says: the stable revision and, during a canary,
    the candidate at its weight. Remote artifacts are pulled into --cache-dir; the server verifies each
    on load and keeps serving what it serves when one is corrupt. A server that is down or refuses is
    retried every --interval seconds."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from autoglm_inference.access import admin_token
    from autoglm_operator.agent.agent import Agent
    from autoglm_operator.agent.report import PodReporter
    from autoglm_operator.backends.local_serving import LocalServing

    try:
        token = admin_token(admin_token_file)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    name = _model_name(config)
    agent = Agent(
        config=config,
        server=LocalServing(name, server, headers=headers),
        cache_dir=cache_dir,
        status_file=status_file,
        reporter=PodReporter.from_environment() if report_pod else None,
    )
    if once:
        result = agent.reconcile_once()
        click.echo(
            f"{'error: ' + result.error if result.error else 'in sync'}; served {result.to_json()['served']}"
        )
        raise SystemExit(1 if result.error else 0)
    agent.run(interval)


def _model_name(config: Path) -> str:
    """The served model's name: the ConfigMap's ``model`` field (the InferenceService serves it as
    ``{{.Name}}``, which the operator writes there as ``served``), read once at start."""
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{config}: cannot read the desired state: {exc}") from exc
    name = data.get("served") or data.get("model") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name:
        raise click.ClickException(f"{config}: names no model ('served' or 'model')")
    return name
