"""The canary's two figure sources on the same live traffic: PromQL against a real Prometheus that
scrapes a real `autoglm serve`, and the in-process scrape of the same server. Both must give the
judge the same verdicts: a healthy candidate passes, a slow one and an erring one fail, and a
source that cannot see the server holds (Inconclusive), never judging on stale samples."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from autoglm_api.spec import Analysis
from autoglm_inference.process import ServerProcess
from autoglm_operator.canary import Figures, judge
from autoglm_operator.metrics import FiguresSource, MetricsUnavailableError, ScrapeSource
from autoglm_operator.promql import PrometheusSource
from tests.support.prometheus import Prometheus, prometheus
from tests.support.servers import faulty_server, load_canary
from tests.support.tiny_models import published_tiny_glms

pytestmark = pytest.mark.integration

LIMITS = Analysis(min_requests=5, max_error_rate=0.5, max_p95_latency_ms=60_000)
REQUESTS = 48  # at canary weight 50: about 24 per revision


World = tuple[ServerProcess, Prometheus, Path]


@contextmanager
def live(tmp_path: Path) -> Iterator[World]:
    """A server with rev-a stable and rev-b at canary weight 50, and a Prometheus scraping it."""
    folders = published_tiny_glms(tmp_path / "artifacts", {"a": 1, "b": 2})
    faults = tmp_path / "faults.json"
    faults.write_text("{}")
    server = faulty_server(tmp_path / "artifacts", "m", folders["a"], faults)
    try:
        load_canary(server, "m", folders["b"], 50)
        send(server, 4)  # both revisions have series before the first window
        targets = tmp_path / "targets.json"
        targets.write_text(json.dumps([{"targets": [server.url.removeprefix("http://")]}]))
        with prometheus(tmp_path / "prometheus", targets) as prom:
            prom.scraped()
            yield server, prom, faults
    finally:
        server.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with live(tmp_path_factory.mktemp("prometheus-source")) as shared:
        yield shared


def send(server: ServerProcess, n: int) -> None:
    for i in range(n):
        httpx.post(
            f"{server.url}/openai/v1/completions",
            json={"model": "m", "prompt": f"To be, or not {i}", "max_tokens": 4},
            timeout=60,
        )


def window(
    server: ServerProcess, prom: Prometheus
) -> tuple[dict[str, Figures | None], dict[str, Figures | None], PrometheusSource]:
    """One analysis window of live traffic, read by both sources at its end."""
    scraped: FiguresSource = ScrapeSource(f"{server.url}/metrics")
    promql = PrometheusSource(prom.url)
    start = datetime.now(UTC)
    scraped.begin(start)
    promql.begin(start)
    time.sleep(1.0)  # Prometheus' first sample of the window is taken before the traffic
    send(server, REQUESTS)
    time.sleep(1.5)  # and its last one after it
    now = datetime.now(UTC)
    return scraped.read("m", ["rev-b", "rev-a"], now), promql.read("m", ["rev-b", "rev-a"], now), promql


@pytest.mark.parametrize(
    ("fault", "outcome", "failed"),
    [
        ({}, "Successful", set()),
        ({"latencyFactor": 4.0}, "Failed", {"latencyVsStable"}),
        ({"errorRate": 0.4}, "Failed", {"errorRateVsStable"}),
    ],
    ids=["healthy", "slow", "erring"],
)
def test_promql_and_the_scrape_give_the_same_verdict(
    world: World, fault: dict[str, float], outcome: str, failed: set[str]
) -> None:
    server, prom, faults = world
    faults.write_text(json.dumps({"revisions": {"rev-b": fault}}))
    scraped, promql, source = window(server, prom)
    for name, got in (("scrape", scraped), ("promql", promql)):
        candidate, stable = got["rev-b"], got["rev-a"]
        assert candidate is not None, (name, got)
        assert stable is not None, (name, got)
        result = judge(candidate, stable, LIMITS)
        assert result.outcome == outcome, (name, result.reason)
        assert {c.metric for c in result.checks if c.passed is False} == failed, (name, result.reason)
    # The same traffic, counted twice: PromQL's increase() extrapolates to the window's edges (a
    # little more) and misses what a series born inside the window counted before its first
    # sample (an error counter's first errors: a little less), never a different story.
    for revision in ("rev-a", "rev-b"):
        exact, asked = scraped[revision], promql[revision]
        assert exact is not None
        assert asked is not None
        assert exact.requests >= LIMITS.min_requests
        assert abs(asked.requests - exact.requests) <= exact.requests * 0.35 + 3, (revision, exact, asked)
        assert abs(asked.error_rate - exact.error_rate) <= 0.1
        assert exact.latency is not None
        assert asked.latency is not None
        assert asked.latency.bounds == exact.latency.bounds
        assert exact.time_to_first_token is not None
        assert asked.time_to_first_token is not None
        assert asked.time_to_first_token.bounds == exact.time_to_first_token.bounds
    assert scraped["rev-a"].requests + scraped["rev-b"].requests == REQUESTS  # type: ignore[union-attr]
    assert any('increase(autoglm_request_duration_seconds_bucket{model="m"' in q for q in source.queries)
    assert any("increase(autoglm_time_to_first_token_seconds_bucket{" in q for q in source.queries)


def test_a_source_that_cannot_see_the_server_holds_the_canary(tmp_path: Path) -> None:
    with live(tmp_path) as (server, prom, faults):
        _cannot_see(server, prom, faults)


def _cannot_see(server: ServerProcess, prom: Prometheus, faults: Path) -> None:
    start = datetime.now(UTC)
    scraped, promql = ScrapeSource(f"{server.url}/metrics"), PrometheusSource(prom.url)
    scraped.begin(start)
    promql.begin(start)
    send(server, 12)
    faults.write_text(json.dumps({"metricsDown": True}))
    prom.scraped(healthy=False)  # Prometheus saw /metrics fail: the series are marked stale
    time.sleep(1.0)
    now = datetime.now(UTC)
    with pytest.raises(MetricsUnavailableError):
        scraped.read("m", ["rev-b", "rev-a"], now)
    got = promql.read("m", ["rev-b", "rev-a"], now)
    assert got == {"rev-b": None, "rev-a": None}  # not the samples from before it went down
    assert judge(got["rev-b"], got["rev-a"], LIMITS).outcome == "Inconclusive"

    with pytest.raises(MetricsUnavailableError, match="bad_data"):
        promql.query("sum(", now)  # Prometheus' own error, named

    prom.stop()  # Prometheus itself down
    with pytest.raises(MetricsUnavailableError, match="Prometheus at"):
        promql.read("m", ["rev-b", "rev-a"], datetime.now(UTC))
