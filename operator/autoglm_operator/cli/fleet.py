"""``autoglm fleet``: the fleet as the dashboards show it, without Grafana."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import click


def _duration(value: str) -> timedelta:
    match = re.fullmatch(r"(\d+)(s|m|h|d)", value.strip())
    if not match:
        raise click.BadParameter(f"{value!r}: give a duration like 90s, 15m, 3h or 1d")
    return timedelta(seconds=int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)])


@click.group("fleet", short_help="The fleet's dashboards without Grafana.")
def fleet_group() -> None:
    """The fleet's latency and energy, drawn from the same queries as the Grafana dashboards."""


@fleet_group.command("snapshot")
@click.option("--prometheus-url", required=True, help="The Prometheus HTTP API that scrapes the servers.")
@click.option("-o", "--output", "folder", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Folder for the PNGs (fleet-latency.png, fleet-energy.png).")  # fmt: skip
@click.option("--range", "window", default="1h", show_default=True, help="How far back: 90s, 15m, 3h, 1d.")
@click.option("--step", type=click.FloatRange(min=0.1), default=None,
              help="Seconds between points (default: the range over 240).")  # fmt: skip
@click.option(
    "--rate-interval", default=None, help="The window of each rate() (default: 4 steps, at least 1m)."
)
@click.option("--model", default=".*", show_default=True, help="Models to show (a PromQL regex).")
@click.option("--target", default=".*", show_default=True, help="Targets to show (a PromQL regex).")
@click.option("--pool", default=".*", show_default=True, help="Pools to show (a PromQL regex).")
def snapshot_command(
    prometheus_url: str,
    folder: Path,
    window: str,
    step: float | None,
    rate_interval: str | None,
    model: str,
    target: str,
    pool: str,
) -> None:
    """Draw the key panels of the fleet latency and fleet energy dashboards to PNG."""
    from autoglm_operator.snapshot import SnapshotError, snapshot

    span = _duration(window)
    step = step or max(span.total_seconds() / 240, 1.0)
    rate = rate_interval or f"{max(int(4 * step), 60)}s"
    try:
        drawn = snapshot(prometheus_url, folder, window=span, step=step, rate_interval=rate,
                         model=model, target=target, pool=pool)  # fmt: skip
    except SnapshotError as exc:
        raise click.ClickException(str(exc)) from exc
    for picture in drawn:
        click.echo(f"{picture.file}: {picture.dashboard}")
        for title, count in picture.panels:
            click.echo(f"  {title}: {count} series" if count else f"  {title}: no data in this range")
