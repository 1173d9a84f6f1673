"""``autoglm fleet snapshot``: the dashboards' key panels drawn to PNG from the same PromQL, for the
README and for people without Grafana. One image per dashboard (fleet latency, fleet energy), each
key panel a plot of every series its queries return over the time range (Prometheus'
``query_range``), with the panel's unit and legend; a panel whose queries return nothing says so in
its plot instead of drawing an empty frame.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from autoglm_operator.dashboards import DASHBOARDS, Dashboard, Panel, expand

#: Grafana's unit ids, as an axis says them.
UNITS = {"s": "seconds", "percentunit": "share (0-1)", "watt": "watts", "J": "joules", "kJ": "kilojoules",
         "reqps": "requests / s", "short": "", "none": ""}  # fmt: skip


class SnapshotError(Exception):
    """Prometheus could not be asked (down, refused the query): the message says which and why."""


@dataclass(frozen=True)
class Series:
    label: str
    times: list[datetime]
    values: list[float]


@dataclass(frozen=True)
class Drawn:
    dashboard: str
    file: Path
    #: Each key panel's title and how many series it drew.
    panels: tuple[tuple[str, int], ...]


def _legend(template: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)
    return " ".join(text.split()) or ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


def query_range(url: str, expr: str, start: datetime, end: datetime, step: float) -> list[dict[str, Any]]:
    try:
        answer = httpx.get(
            f"{url.rstrip('/')}/api/v1/query_range",
            params={"query": expr, "start": start.timestamp(), "end": end.timestamp(), "step": step},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        raise SnapshotError(f"Prometheus at {url} cannot be reached: {exc}") from exc
    body = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
    if answer.status_code != 200 or body.get("status") != "success":
        raise SnapshotError(
            f"Prometheus refused {expr!r}: {answer.status_code} {body.get('error', answer.text[:200])}"
        )
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def panel_series(
    url: str, panel: Panel, start: datetime, end: datetime, step: float, rate_interval: str, **variables: str
) -> list[Series]:
    found = []
    for query in panel.queries:
        for item in query_range(
            url, expand(query.expr, rate_interval=rate_interval, **variables), start, end, step
        ):
            points = [(datetime.fromtimestamp(float(t), UTC), float(v)) for t, v in item["values"]]
            points = [(t, v) for t, v in points if math.isfinite(v)]
            if points:
                found.append(
                    Series(
                        _legend(query.legend, item["metric"]), [t for t, _ in points], [v for _, v in points]
                    )
                )
    return found


def draw(
    dashboard: Dashboard,
    url: str,
    output: Path,
    *,
    window: timedelta,
    step: float,
    rate_interval: str,
    end: datetime | None = None,
    **variables: str,
) -> Drawn:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    end = end or datetime.now(UTC)
    start = end - window
    panels = [p for p in dashboard.panels if p.key]
    columns = 2
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(7 * columns, 3.6 * rows), squeeze=False)
    drawn = []
    for ax, panel in zip(axes.flat, panels, strict=False):
        series = panel_series(url, panel, start, end, step, rate_interval, **variables)
        for s in series:
            ax.plot(s.times, s.values, label=s.label, linewidth=1.4)
        ax.set_title(panel.title, fontsize=10, loc="left")
        ax.set_ylabel(UNITS.get(panel.unit, panel.unit), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))  # type: ignore[no-untyped-call]
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=6, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data in this range", ha="center", va="center", transform=ax.transAxes)
        drawn.append((panel.title, len(series)))
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    figure.suptitle(f"{dashboard.title}   {start:%Y-%m-%d %H:%M:%S} to {end:%H:%M:%S} UTC", fontsize=11)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return Drawn(dashboard.title, output, tuple(drawn))


def snapshot(
    url: str, folder: Path, *, window: timedelta, step: float, rate_interval: str, **variables: str
) -> list[Drawn]:
    """Every Prometheus dashboard's key panels, one PNG each, into ``folder``."""
    end = datetime.now(UTC)
    return [
        draw(d, url, folder / d.file.replace(".json", ".png"), window=window, step=step,
             rate_interval=rate_interval, end=end, **variables)
        for d in DASHBOARDS
        if d.datasource == "prometheus" and any(p.key for p in d.panels)
    ]  # fmt: skip
