"""The Grafana dashboards of ``charts/autoglm/dashboards/``, built with Grafana's
grafana-foundation-sdk from the panels in ``autoglm_operator.dashboards`` (the same ones
``autoglm fleet snapshot`` draws). ``make dashboards`` writes them; ``tests/unit/test_dashboards.py``
fails when a committed file drifts from this code.

Usage: ``python -m tools.dashboards write`` | ``python -m tools.dashboards check``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as gm

from autoglm_operator.dashboards import DASHBOARDS, Dashboard, Panel
from tools import generated as generated_files

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "charts" / "autoglm" / "dashboards"
PROMETHEUS = gm.DataSourceRef(type_val="prometheus", uid="${datasource}")
POSTGRES = gm.DataSourceRef(type_val="grafana-postgresql-datasource", uid="${ledger}")
HEIGHT = 8


class SqlQuery(cogvariants.Dataquery):
    """A raw-SQL target of Grafana's PostgreSQL data source (the SDK has no builder for it)."""

    def __init__(self, ref_id: str, sql: str, fmt: str) -> None:
        self.ref_id, self.sql, self.fmt = ref_id, sql, fmt

    def to_json(self) -> dict[str, Any]:
        return {"refId": self.ref_id, "datasource": POSTGRES.to_json(), "editorMode": "code",
                "format": self.fmt, "rawQuery": True, "rawSql": self.sql}  # fmt: skip


class SqlQueryBuilder:
    def __init__(self, query: SqlQuery) -> None:
        self.query = query

    def build(self) -> SqlQuery:
        return self.query


def _panel(dash: Dashboard, panel: Panel, x: int, y: int) -> Any:
    builder: Any = {"timeseries": timeseries.Panel, "table": table.Panel, "stat": stat.Panel}[panel.kind]()
    builder = builder.title(panel.title).description(panel.description).unit(panel.unit)
    builder = builder.grid_pos(
        gm.GridPos(h=HEIGHT * (2 if panel.kind == "table" else 1), w=panel.width, x=x, y=y)
    )
    for index, query in enumerate(panel.queries):
        ref = chr(ord("A") + index)
        if dash.datasource == "prometheus":
            builder = builder.datasource(PROMETHEUS).with_target(
                prometheus.Dataquery().expr(query.expr).legend_format(query.legend or "__auto").ref_id(ref)
            )
        else:
            fmt = "table" if panel.kind in ("table", "stat") else "time_series"
            builder = builder.datasource(POSTGRES).with_target(
                SqlQueryBuilder(SqlQuery(ref, query.expr, fmt))
            )
    return builder


def _variables(dash: Dashboard) -> list[Any]:
    if dash.datasource == "postgres":
        models = gd.QueryVariable("model").label("Model").datasource(POSTGRES).query(
            "SELECT DISTINCT model FROM audit_records ORDER BY 1"
        )  # fmt: skip
        return [
            gd.DatasourceVariable("ledger").label("Audit ledger").type("grafana-postgresql-datasource"),
            models.include_all(True).all_value(".*").refresh(gm.VariableRefresh.ON_TIME_RANGE_CHANGED),
        ]
    found = [gd.DatasourceVariable("datasource").label("Prometheus").type("prometheus")]
    for name, label in (("model", "Model"), ("target", "Target"), ("pool", "Pool")):
        found.append(
            gd.QueryVariable(name).label(label).datasource(PROMETHEUS)
            .query(f"label_values(autoglm_request_duration_seconds_count, {name})")
            .include_all(True).all_value(".*").multi(True)
            .refresh(gm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        )  # fmt: skip
    return found


def build(dash: Dashboard) -> dict[str, Any]:
    builder = (
        gd.Dashboard(dash.title)
        .uid(dash.uid)
        .description(dash.description)
        .tags(["autoglm", "generated"])
        .editable()
        .refresh("30s")
        .time("now-3h", "now")
    )
    for variable in _variables(dash):
        builder = builder.with_variable(variable)
    x = y = 0
    for panel in dash.panels:
        if x + panel.width > 24:
            x, y = 0, y + HEIGHT
        builder = builder.with_panel(_panel(dash, panel, x, y))
        x += panel.width
        if panel.kind == "table":
            x, y = 0, y + HEIGHT * 2
    document: dict[str, Any] = json.loads(JSONEncoder(sort_keys=True).encode(builder.build()))
    return document


def generated() -> dict[Path, str]:
    return {FOLDER / d.file: json.dumps(build(d), indent=2, sort_keys=True) + "\n" for d in DASHBOARDS}


def main(argv: list[str]) -> int:
    return generated_files.main(argv, generated, "dashboards", __doc__ or "", FOLDER / "*.json")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
