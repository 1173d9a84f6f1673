"""The dashboards as code: the committed Grafana JSON is what tools/dashboards.py builds from
``autoglm_operator.dashboards`` with grafana-foundation-sdk; the chart ships each as a ConfigMap
Grafana's sidecar picks up; every energy series names how it was measured. (That every query
returns data is tests/integration/test_dashboards_live.py, against a real Prometheus and PostgreSQL.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from autoglm_operator.dashboards import DASHBOARDS, FLEET_ENERGY, expand

dashboards_tool = pytest.importorskip("tools.dashboards")
helm = pytest.importorskip("helm_python")

REPO = Path(__file__).resolve().parents[2]


def test_the_committed_dashboards_are_what_the_code_builds() -> None:
    assert dashboards_tool.main(["dashboards.py", "check"]) == 0, "run `make dashboards`"


def test_each_dashboard_has_its_queries_variables_and_a_unique_uid() -> None:
    uids = set()
    for dashboard in DASHBOARDS:
        document = json.loads((REPO / "charts" / "autoglm" / "dashboards" / dashboard.file).read_text())
        assert document["uid"] == dashboard.uid
        uids.add(document["uid"])
        exprs = [t.get("expr") or t.get("rawSql") for p in document["panels"] for t in p["targets"]]
        assert exprs == [q.expr for p in dashboard.panels for q in p.queries]
        names = {v["name"] for v in document["templating"]["list"]}
        used = {m for e in exprs for m in re.findall(r"\$\{?(\w+)", e) if not m.startswith("__")}
        assert used <= names, f"{dashboard.uid}: variables used but not defined: {used - names}"
        for panel in document["panels"]:
            assert panel["datasource"]["uid"] in ("${datasource}", "${ledger}")
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    assert len(uids) == len(DASHBOARDS)


def test_every_energy_series_names_its_method_of_measurement() -> None:
    for panel in FLEET_ENERGY.panels:
        for query in panel.queries:
            if "energy" in query.expr or "joules" in query.expr:
                assert "{{method}}" in query.legend, panel.title
                assert re.search(r"by \([^)]*method", query.expr), panel.title
    assert "method" in FLEET_ENERGY.description


def test_the_chart_ships_every_dashboard_to_grafanas_sidecar() -> None:
    manifests = helm.Chart.load(str(REPO / "charts" / "autoglm")).render({}, name="autoglm", namespace="ns")
    maps = [
        doc
        for text in manifests.values()
        for doc in yaml.safe_load_all(text)
        if doc and doc["kind"] == "ConfigMap" and "dashboard" in doc["metadata"]["name"]
    ]
    assert len(maps) == len(DASHBOARDS)
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["annotations"]["grafana_folder"] == "AutoGLM"
        ((name, body),) = config_map["data"].items()
        assert json.loads(body) == json.loads((REPO / "charts" / "autoglm" / "dashboards" / name).read_text())
    off = helm.Chart.load(str(REPO / "charts" / "autoglm")).render(
        {"dashboards": {"enabled": False}}, name="a"
    )
    assert "dashboard" not in "".join(off.values()).lower().replace("dashboards.yaml", "")


def test_expand_fills_every_variable_and_macro() -> None:
    for dashboard in DASHBOARDS:
        for panel in dashboard.panels:
            for query in panel.queries:
                assert not re.search(r"\$\{?\w", expand(query.expr)), query.expr
    assert 'model=~"support-glm"' in expand(DASHBOARDS[0].panels[0].queries[0].expr, model="support-glm")
