"""``autoglm feedback``: the feedback API alone, the feature pipeline into Feast, and the features.

- ``serve``: ``POST /v1/feedback`` on its own (the model servers also carry it with ``--feedback-url``);
- ``push``: the micro-batch pipeline from the feedback store into the Feast repository; it first
  replays what a killed run left unpushed;
- ``features MODEL``: the online features of each revision and prompt variant of MODEL.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from autoglm_core.feedback.store import URL_ENV

DEFAULT_FEAST_DIR = Path(".autoglm/feast")
FEAST_DIR_ENV = "AUTOGLM_FEAST_DIR"
ONLINE_STORE_ENV = "AUTOGLM_FEAST_ONLINE_STORE"

_url = click.option("--feedback-url", envvar=URL_ENV, required=True, show_envvar=True,
                    help="The feedback store: sqlite:///PATH or postgresql://... (what the servers' --feedback-url names).")  # fmt: skip
_feast = click.option("--feast-dir", envvar=FEAST_DIR_ENV, type=click.Path(file_okay=False, path_type=Path),
                      default=DEFAULT_FEAST_DIR, show_default=True, show_envvar=True,
                      help="The Feast repository's data: registry, offline parquet files, the SQLite online store.")  # fmt: skip
_online = click.option("--online-store", envvar=ONLINE_STORE_ENV, default="sqlite", show_default=True,
                       show_envvar=True, help="sqlite (in --feast-dir), redis://HOST:PORT or postgresql://USER:PASS@HOST/DB.")  # fmt: skip


@click.group("feedback")
def feedback_group() -> None:
    """User feedback: the API, the Feast features it feeds, and what they say."""


@feedback_group.command("serve")
@_url
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on; a pod sets 0.0.0.0."
)
@click.option("--port", type=click.IntRange(1, 65535), default=8081, show_default=True)
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="File holding the writers' bearer token; else $AUTOGLM_FEEDBACK_TOKEN; with neither, "
                   "only loopback clients may write.")  # fmt: skip
def serve_feedback(feedback_url: str, host: str, port: int, token_file: Path | None) -> None:
    """Serve POST /v1/feedback alone, on the store the model servers log their requests to."""
    import uvicorn

    from autoglm_core.feedback.store import FeedbackStore
    from autoglm_inference.access import admin_token
    from autoglm_inference.options import FEEDBACK_TOKEN_ENV
    from autoglm_inference.routes.feedback import feedback_app

    try:
        token = admin_token(token_file, env=FEEDBACK_TOKEN_ENV, role="feedback")
        store = FeedbackStore(feedback_url)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    uvicorn.run(feedback_app(store, token), host=host, port=port, log_level="info")


@feedback_group.command("push")
@_url
@_feast
@_online
@click.option("--interval", type=click.FloatRange(0.1), default=5.0, show_default=True,
              help="Seconds between micro-batches.")  # fmt: skip
@click.option("--once", is_flag=True, help="Push what is waiting, then exit.")
@click.option(
    "--model", "models", multiple=True, help="Repeatable: also refresh these models' request features."
)
def push_command(
    feedback_url: str,
    feast_dir: Path,
    online_store: str,
    interval: float,
    once: bool,
    models: tuple[str, ...],
) -> None:
    """Feed the Feast repository from the feedback store in micro-batches (replaying a killed run's)."""
    logging.basicConfig(level=logging.WARNING)
    from autoglm_core.feedback.store import FeedbackStore
    from autoglm_feedback.features import FeaturePipeline, close_features, open_features

    try:
        store = FeedbackStore(feedback_url)
        pipeline = FeaturePipeline(store, open_features(feast_dir, online_store), feast_dir)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    pending = store.count_feedback(pushed=False)
    if pending:
        click.echo(f"replaying {pending} feedback events not pushed yet")
    try:
        while True:
            n = pipeline.run_until_empty(models=models)
            if n or once:
                click.echo(
                    f"pushed features of {n} feedback events ({pipeline.pushed_rows} feature rows so far)"
                )
            if once:
                return
            time.sleep(interval)
    finally:
        close_features(pipeline.features)


@feedback_group.command("features")
@click.argument("model")
@_url
@_feast
@_online
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def features_command(model: str, feedback_url: str, feast_dir: Path, online_store: str, output: str) -> None:
    """Print MODEL's online features: each revision and prompt variant's feedback score and volume,
    requests, error rate, p95 latency, joules per token, and its revision's drift."""
    import json

    from sqlalchemy import select

    from autoglm_core.feedback.store import FeedbackStore, feedback_table, requests_table
    from autoglm_feedback.features import close_features, online_stats, open_features

    try:
        store = FeedbackStore(feedback_url)
        features = open_features(feast_dir, online_store)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    with store.engine.connect() as conn:
        keys = {
            (model, row.revision, row.prompt_variant)
            for table in (requests_table, feedback_table)
            for row in conn.execute(
                select(table.c.revision, table.c.prompt_variant).where(table.c.model == model).distinct()
            )
        }
    try:
        stats = online_stats(features, sorted(keys))
    finally:
        close_features(features)
    rows = [{"revision": r, "prompt_variant": v, **values} for (_m, r, v), values in stats.items()
            if values.get("requests") is not None or values.get("feedback_count") is not None]  # fmt: skip
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no features of {model} yet: has `autoglm feedback push` run on {feedback_url}?")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model}: online features (Feast, {online_store})")
    columns = ("revision", "prompt_variant", "feedback_score", "feedback_count", "requests", "error_rate",
               "latency_p95_s", "joules_per_token", "drift_statistic")  # fmt: skip
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_shown(row.get(c)) for c in columns))
    Console(width=200).print(table)


def _shown(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
