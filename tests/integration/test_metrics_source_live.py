"""The canary's figures scraped from a real `autoglm serve`: what was sent is what is counted."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from autoglm_api.spec import Analysis
from autoglm_inference.process import ServerProcess
from autoglm_operator.canary import judge
from autoglm_operator.metrics import MetricsUnavailableError, figures, scrape
from tests.support.tiny_models import tiny_glm, with_model_card

pytestmark = pytest.mark.integration


def test_scraped_figures_count_the_requests_errors_and_latencies_sent(tmp_path: Path) -> None:
    folder = tiny_glm(tmp_path / "m", init_std=0.3, seed=2)
    with_model_card(folder, "rev-live")
    server = ServerProcess(
        "live", str(folder), "--max-prompt-tokens", "32", log=tmp_path / "server.log"
    ).wait_ready()
    try:
        url = f"{server.url}/metrics"
        before = scrape(url)
        for i in range(6):
            r = httpx.post(
                f"{server.url}/openai/v1/completions",
                json={"model": "live", "prompt": f"To be, or not {i}", "max_tokens": 4},
                timeout=60,
            )
            assert r.status_code == 200, r.text
        too_long = httpx.post(
            f"{server.url}/openai/v1/completions",
            json={"model": "live", "prompt": "words " * 200, "max_tokens": 4},
            timeout=60,
        )
        assert too_long.status_code == 400
        after = scrape(url)
    finally:
        assert server.stop() == 0
    got = figures(after, before, "live", "rev-live")
    assert got is not None
    assert (got.requests, got.errors) == (7, 1)
    assert got.latency is not None
    assert got.latency.total == 6
    assert 0 < got.latency.quantile(0.95) < 60_000
    assert got.time_to_first_token is not None
    assert got.time_to_first_token.total == 6  # one first token per finished generation
    assert got.time_to_first_token.quantile(0.5) <= got.latency.quantile(0.5)
    assert got.joules_per_token is not None
    assert got.joules_per_token > 0
    verdict = judge(got, None, Analysis(min_requests=5, max_error_rate=0.5))
    assert verdict.outcome == "Successful", verdict.reason

    with pytest.raises(MetricsUnavailableError):  # the server is gone: Inconclusive upstream, not a crash
        scrape(url, timeout=1)
