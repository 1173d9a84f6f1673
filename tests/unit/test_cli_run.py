"""`autoglm run`'s options: a bad value is refused by name before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from autoglm_api.status import AutoGLMModelStatus
from autoglm_inference.cli import serve_command
from autoglm_operator import embedded
from autoglm_operator.cli.main import cli
from autoglm_operator.embedded import EmbeddedLoop, LoopOptions


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """A file that exists: the options below are refused or passed on before it is read."""
    path = tmp_path / "m.yaml"
    path.write_text("kind: AutoGLMModel\n")
    return path


def test_a_prometheus_url_that_is_not_http_is_refused_by_name(manifest: Path) -> None:
    result = CliRunner().invoke(cli, ["run", str(manifest), "--prometheus-url", "localhost:9090"])
    assert result.exit_code == 2
    assert "'localhost:9090' is not an http:// or https:// URL of a Prometheus HTTP API" in result.output


def test_a_stream_interval_reaches_every_targets_server_as_it_reads_it(
    manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[LoopOptions] = []

    class Stop(EmbeddedLoop):
        def __init__(self, _manifest: Path, options: LoopOptions) -> None:
            seen.append(options)

        def run(self) -> AutoGLMModelStatus:
            raise TimeoutError("stopped by the test")

        def close(self) -> None:
            pass

    monkeypatch.setattr(embedded, "EmbeddedLoop", Stop)
    CliRunner().invoke(cli, ["run", str(manifest), "--stream-interval-ms", "50"])
    CliRunner().invoke(cli, ["run", str(manifest)])
    gathered, default = seen
    assert default.server_args == ()  # an event per token, the server's own default
    # what _start_server passes to `autoglm serve`, read by the server's own parser
    context = serve_command.make_context("serve", ["--model-name=m", "--model-uri=u", *gathered.server_args])
    assert context.params["stream_interval_ms"] == 50


def test_a_stream_interval_over_the_servers_limit_is_refused_by_name(manifest: Path) -> None:
    result = CliRunner().invoke(cli, ["run", str(manifest), "--stream-interval-ms", "5000"])
    assert result.exit_code == 2
    assert "--stream-interval-ms" in result.output
    assert "0<=x<=1000" in result.output
