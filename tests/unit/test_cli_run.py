"""`autoglm run`'s options: a bad value is refused by name before anything starts."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from autoglm_operator.cli.main import cli


def test_a_prometheus_url_that_is_not_http_is_refused_by_name(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text("kind: AutoGLMModel\n")
    result = CliRunner().invoke(cli, ["run", str(manifest), "--prometheus-url", "localhost:9090"])
    assert result.exit_code == 2
    assert "'localhost:9090' is not an http:// or https:// URL of a Prometheus HTTP API" in result.output
