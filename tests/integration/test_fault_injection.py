"""The test-only fault injection of `autoglm serve`: refused outside tests; per revision it makes
requests fail, charges more energy and holds answers longer; it can take /metrics down."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from autoglm_inference.cli import serve_command
from autoglm_inference.faults import ENABLE_ENV, Faults, FaultsRefusedError
from autoglm_operator.metrics import MetricsUnavailableError, figures, scrape
from tests.support.servers import faulty_server, load_canary
from tests.support.tiny_models import published_tiny_glms

pytestmark = pytest.mark.integration


def test_the_option_is_refused_outside_tests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text("{}")
    monkeypatch.delenv(ENABLE_ENV, raising=False)
    with pytest.raises(FaultsRefusedError, match=f"refused unless {ENABLE_ENV}=1"):
        Faults(faults)
    result = CliRunner().invoke(
        serve_command, ["--model-name", "m", "--model-uri", str(tmp_path), "--test-faults", str(faults)]
    )
    assert result.exit_code != 0
    assert "for tests only" in result.output
    assert "--test-faults" not in CliRunner().invoke(serve_command, ["--help"]).output  # hidden


def test_a_faults_file_that_is_not_understood_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENABLE_ENV, "1")
    path = tmp_path / "faults.json"
    path.write_text(json.dumps({"revisions": {"r": {"latency": 2}}}))
    with pytest.raises(FaultsRefusedError, match="allowed keys are"):
        Faults(path)
    path.write_text(json.dumps({"revisions": {"r": {"errorRate": "often"}}}))
    with pytest.raises(FaultsRefusedError, match="every value must be a number"):
        Faults(path)
    path.write_text(json.dumps({"revisions": {"r": {"errorRate": 1.5}}}))
    with pytest.raises(FaultsRefusedError, match=r"errorRate in \[0, 1\]"):
        Faults(path)


def test_faults_hit_only_their_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENABLE_ENV, "1")
    folders = published_tiny_glms(tmp_path / "artifacts", {"a": 1, "b": 2})
    faults = tmp_path / "faults.json"
    faults.write_text(
        json.dumps({"revisions": {"rev-b": {"errorRate": 0.5, "joulesFactor": 20, "latencyFactor": 5}}})
    )
    server = faulty_server(tmp_path / "artifacts", "m", folders["a"], faults)
    try:
        load_canary(server, "m", folders["b"], 0)
        codes: dict[str, list[int]] = {"rev-a": [], "rev-b": []}
        for i in range(24):
            revision = "rev-a" if i % 2 else "rev-b"
            r = httpx.post(
                f"{server.url}/openai/v1/completions",
                json={"model": "m", "prompt": "To be, or not", "max_tokens": 4},
                headers={"x-autoglm-revision": revision},
                timeout=60,
            )
            codes[revision].append(r.status_code)
            if r.status_code == 500:
                assert "injected test fault" in r.json()["error"]
        assert set(codes["rev-a"]) == {200}
        assert codes["rev-b"] == [500, 200] * 6  # half of them, spread evenly
        page = scrape(f"{server.url}/metrics")
        a, b = figures(page, None, "m", "rev-a"), figures(page, None, "m", "rev-b")
        assert a is not None
        assert b is not None
        assert (a.errors, b.errors) == (0, codes["rev-b"].count(500))
        assert a.joules_per_token
        assert b.joules_per_token
        assert b.joules_per_token / a.joules_per_token > 5  # x20 charged; the two models cost alike
        assert a.latency is not None
        assert b.latency is not None
        assert b.latency.quantile(0.5) > 2 * a.latency.quantile(0.5)  # held x5 its generation time

        faults.write_text(json.dumps({"metricsDown": True}))  # re-read: the source goes down
        with pytest.raises(MetricsUnavailableError, match="503"):
            scrape(f"{server.url}/metrics")
        faults.write_text(json.dumps({}))
        assert scrape(f"{server.url}/metrics")
    finally:
        assert server.stop() == 0
