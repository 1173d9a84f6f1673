"""Every query of the dashboards runs against the real thing and returns data: each PromQL
expression against a real Prometheus (Debian's package) scraping two running ``autoglm serve``
processes under load, one in a cloud pool with a canary at 50% and some failing requests, one on an
edge pool (the pool label as the chart's PodMonitor adds it); each SQL query of the Decisions
dashboard against the audit ledger in the real PostgreSQL of ``.ci/postgres.sh``."""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from autoglm_core.audit.ledger import Ledger
from autoglm_core.card import write_model_card
from autoglm_inference.faults import ENABLE_ENV
from autoglm_inference.process import ServerProcess
from autoglm_operator.dashboards import DASHBOARDS, DECISIONS, FLEET_ENERGY, FLEET_LATENCY, expand
from tests.support.prometheus import Prometheus, prometheus
from tests.support.servers import load_canary
from tests.support.tiny_models import tiny_glm

pytestmark = pytest.mark.integration

MODEL = "m"
#: What validate measured, as a published card carries it: the candidate used half its source's energy.
VALIDATION = {
    "candidate": {"joulesPerToken": 0.5, "energyMethod": "cpu-time-model"},
    "baseline": {"joulesPerToken": 1.0, "energyMethod": "cpu-time-model"},
}


def _artifact(root: Path, name: str, seed: int) -> Path:
    folder = tiny_glm(root / name, seed=seed)
    write_model_card(folder, {"model": "test/tiny", "revision": f"rev-{name}", "validation": VALIDATION})
    return folder


def _load(server: ServerProcess, clients: int = 4, each: int = 16) -> None:
    """Concurrent chat completions, half of them streamed: batches form, queues fill, TTFT is timed."""

    def client(index: int) -> None:
        with httpx.Client(timeout=120) as http:
            for i in range(each):
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"To be {index} {i}"}],
                        "max_tokens": 6, "stream": i % 2 == 1}  # fmt: skip
                http.post(f"{server.url}/openai/v1/chat/completions", json=body)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    root = tmp_path_factory.mktemp("fleet")
    stable, canary, edge = (_artifact(root / "artifacts", n, s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    faults = root / "faults.json"
    faults.write_text(json.dumps({"revisions": {"rev-a": {"errorRate": 0.3}}, "metricsDown": False}))
    servers: list[ServerProcess] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENABLE_ENV, "1")
        try:
            servers.append(ServerProcess(
                MODEL, str(stable), "--target", "cloud", "--test-faults", str(faults), "--max-batch-size", "4",
                log=root / "cloud.log", model_roots=[root / "artifacts"],
            ).wait_ready())  # fmt: skip
            servers.append(ServerProcess(
                MODEL, str(edge), "--target", "edge", log=root / "edge.log", model_roots=[root / "artifacts"]
            ).wait_ready())  # fmt: skip
            load_canary(servers[0], MODEL, canary, 50)
            for server in servers:  # every series exists before Prometheus' first scrape
                _load(server, clients=1, each=8)  # errors too: the error series exists from the start
            targets = root / "targets.json"
            targets.write_text(json.dumps([
                {"targets": [servers[0].url.removeprefix("http://")], "labels": {"pool": "cloud-gpu"}},
                {"targets": [servers[1].url.removeprefix("http://")], "labels": {"pool": "kubeedge"}},
            ]))  # fmt: skip
            with prometheus(root / "prometheus", targets) as prom:
                prom.scraped()
                loads = [threading.Thread(target=_load, args=(s,)) for s in servers]
                for t in loads:
                    t.start()
                for t in loads:
                    t.join()
                time.sleep(2.0)  # a few scrapes after the load: every rate has samples on both sides
                yield prom
        finally:
            for server in servers:
                server.stop()


def _query(prom: Prometheus, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{prom.url}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert answer["status"] == "success", (expr, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def _finite(result: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in result if math.isfinite(float(r["value"][1]))]


PROMQL = [
    (dashboard.uid, panel.title, index, query.expr)
    for dashboard in DASHBOARDS
    if dashboard.datasource == "prometheus"
    for panel in dashboard.panels
    for index, query in enumerate(panel.queries)
]


@pytest.mark.parametrize(
    ("uid", "title", "index", "expr"), PROMQL, ids=[f"{t} [{i}]" for _, t, i, _ in PROMQL]
)
def test_every_promql_expression_returns_data(
    fleet: Prometheus, uid: str, title: str, index: int, expr: str
) -> None:
    result = _finite(_query(fleet, expand(expr, rate_interval="1m")))
    assert result, f"{uid} / {title} [{index}] returned no data: {expand(expr, rate_interval='1m')}"


def _panel(dashboard: Any, title: str) -> str:
    return next(p for p in dashboard.panels if p.title == title).queries[0].expr


def test_the_dashboards_variables_list_the_fleet(fleet: Prometheus) -> None:
    """Grafana fills $model, $target and $pool with label_values(METRIC, LABEL): Prometheus' label
    values API on the same series."""
    from tools.dashboards import build

    for dashboard in (FLEET_LATENCY, FLEET_ENERGY):
        for variable in build(dashboard)["templating"]["list"]:
            if variable["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"])
            assert match, variable["query"]
            metric, label = match.groups()
            answer = httpx.get(
                f"{fleet.url}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=30
            )
            values = set(json.loads(answer.text)["data"])
            expected = {"model": {MODEL}, "target": {"cloud", "edge"}, "pool": {"cloud-gpu", "kubeedge"}}[
                label
            ]
            assert values == expected, (variable["name"], values)


def test_the_panels_tell_pools_roles_and_savings_apart(fleet: Prometheus) -> None:
    pools = _finite(
        _query(
            fleet,
            expand(_panel(FLEET_LATENCY, "Cloud against edge: latency p95 by pool"), rate_interval="1m"),
        )
    )
    assert {r["metric"]["pool"] for r in pools} == {"cloud-gpu", "kubeedge"}
    roles = _finite(
        _query(fleet, expand(_panel(FLEET_LATENCY, "Canary against stable: latency p95"), rate_interval="1m"))
    )
    assert {r["metric"]["role"] for r in roles} == {"stable", "canary"}
    errors = _finite(_query(fleet, expand(_panel(FLEET_LATENCY, "Error rate"), rate_interval="1m")))
    by_target = {r["metric"]["target"]: float(r["value"][1]) for r in errors}
    assert by_target["cloud"] > 0  # the faults fail 30% of stable's requests
    assert by_target["edge"] == 0
    saved = _query(fleet, expand(_panel(FLEET_ENERGY, "Energy saved by compression")))
    assert {r["metric"]["revision"] for r in saved} == {"rev-a", "rev-b", "rev-c"}
    assert all(float(r["value"][1]) == pytest.approx(0.5) for r in saved)
    assert all(r["metric"]["method"] == "cpu-time-model" for r in saved)
    power = _finite(
        _query(fleet, expand(_panel(FLEET_ENERGY, "Power by pool and revision"), rate_interval="1m"))
    )
    assert all(r["metric"].get("method") for r in power)  # every energy series names its method


def test_the_decisions_sql_runs_on_the_ledgers_postgresql() -> None:
    url = os.environ.get("AUTOGLM_TEST_POSTGRES_URL")
    if not url:
        missing = pytest.fail if os.environ.get("CI") else pytest.skip
        missing("set AUTOGLM_TEST_POSTGRES_URL (bash .ci/postgres.sh start prints one; CI does)")
    model = f"dash-{os.getpid()}"
    with Ledger(str(url)) as ledger:
        for decision, revision in (("PipelineStarted", "r1"), ("GatePassed", "r1"), ("Promoted", "r1"),
                                   ("RolloutStarted", "r2"), ("RolledBack", "r2")):  # fmt: skip
            ledger.append(
                "ml", model, decision, f"{decision} of {revision}", revision=revision, actor="operator"
            )
    from tools.dashboards import build

    (models,) = [v for v in build(DECISIONS)["templating"]["list"] if v["name"] == "model"]
    engine = create_engine(str(url))
    try:
        with engine.connect() as connection:
            listed = [r[0] for r in connection.execute(text(models["query"]))]
            assert model in listed  # the $model variable lists the ledger's models
            rows = {
                panel.title: connection.execute(
                    text(expand(panel.queries[0].expr, model=model).replace(":", r"\:"))
                )
                .mappings()
                .all()
                for panel in DECISIONS.panels
            }
    finally:
        engine.dispose()
    table = rows["Decisions"]
    assert [r["decision"] for r in table] == [
        "RolledBack",
        "RolloutStarted",
        "Promoted",
        "GatePassed",
        "PipelineStarted",
    ]
    assert {r["model"] for r in table} == {model}
    per_kind = rows["Decisions per hour by kind"]
    assert sum(r["value"] for r in per_kind) == 5
    assert {r["metric"] for r in per_kind} == {
        "PipelineStarted",
        "GatePassed",
        "Promoted",
        "RolloutStarted",
        "RolledBack",
    }
    assert rows["Rollbacks and failed gates"][0]["value"] == 1


def test_fleet_snapshot_draws_every_key_panel(fleet: Prometheus, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from autoglm_operator.cli.main import cli

    folder = Path(os.environ.get("AUTOGLM_SNAPSHOT_DIR") or tmp_path)  # set it to keep the pictures
    done = CliRunner().invoke(cli, ["fleet", "snapshot", "--prometheus-url", fleet.url, "-o", str(folder),
                                    "--range", "90s", "--step", "1", "--rate-interval", "30s"])  # fmt: skip
    assert done.exit_code == 0, done.output
    key = {p.title for d in (FLEET_LATENCY, FLEET_ENERGY) for p in d.panels if p.key}
    for title in key:
        assert re.search(rf"^  {re.escape(title)}: \d+ series$", done.output, flags=re.M), (
            title,
            done.output,
        )
    for name in ("fleet-latency.png", "fleet-energy.png"):
        with Image.open(folder / name) as picture:
            assert picture.size[0] >= 1000
            assert sum(1 for count in picture.convert("L").histogram() if count) > 20  # not a blank frame


def test_fleet_snapshot_names_a_prometheus_that_is_down(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from autoglm_operator.cli.main import cli

    done = CliRunner().invoke(
        cli, ["fleet", "snapshot", "--prometheus-url", "http://127.0.0.1:9", "-o", str(tmp_path)]
    )
    assert done.exit_code == 1
    assert "Prometheus at http://127.0.0.1:9 cannot be reached" in done.output
    bad = CliRunner().invoke(cli, ["fleet", "snapshot", "--prometheus-url", "http://x", "--range", "soon"])
    assert bad.exit_code == 2
    assert "give a duration like 90s" in bad.output
