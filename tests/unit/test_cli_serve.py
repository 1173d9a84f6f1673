"""``autoglm serve`` refuses what it cannot serve before it listens on anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from autoglm_operator.cli.main import cli
from tests.support.tiny_models import tiny_glm


def serve(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["serve", "--model-name", "m", "--http-port", "1", *args])
    return result.exit_code, result.output


def test_a_missing_artifact_is_a_one_line_error(tmp_path: Path) -> None:
    code, output = serve("--model-uri", str(tmp_path / "nope"))
    assert code == 1
    assert "does not exist" in output


def test_a_mismatched_digest_is_refused(tmp_path: Path) -> None:
    folder = tiny_glm(tmp_path / "m")
    code, output = serve("--model-uri", str(folder), "--sha256", "0" * 64)
    assert code == 1
    assert "not the requested" in output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_cuda_without_one_says_what_to_use(tmp_path: Path) -> None:
    folder = tiny_glm(tmp_path / "m")
    code, output = serve("--model-uri", str(folder), "--device", "cuda")
    assert code == 1
    assert "no CUDA device" in output
    assert "auto" in output


def test_limits_are_checked_by_the_option_parser() -> None:
    code, output = serve("--model-uri", "x", "--max-batch-size", "0")
    assert code == 2
    assert "--max-batch-size" in output


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-queue", "0"),
        ("--max-batch-size", "0"),
        ("--max-prompt-tokens", "0"),
        ("--max-new-tokens", "-1"),
        ("--max-body-bytes", "0"),
        ("--max-batch-delay-ms", "-1"),
        ("--stream-interval-ms", "-1"),
        ("--threads", "0"),
        ("--http-port", "0"),
    ],
)
def test_every_bad_limit_is_a_one_line_usage_error(flag: str, value: str) -> None:
    code, output = serve("--model-uri", "x", flag, value)
    assert code == 2
    assert flag in output
    assert "Traceback" not in output


def test_a_bad_device_or_model_root_is_a_one_line_error(tmp_path: Path) -> None:
    for args, needle in [
        (["--device", "gpu"], "use cpu, cuda, cuda:N or auto"),
        (["--model-root", "s3://bucket/models"], "--model-root"),
    ]:
        code, output = serve("--model-uri", str(tmp_path), *args)
        assert code == 1, output
        assert needle in output
        assert "Traceback" not in output


def test_an_empty_admin_token_file_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("\n")
    code, output = serve("--model-uri", str(tmp_path), "--admin-token-file", str(token))
    assert code == 1
    assert "admin token file is empty" in output


def test_the_command_line_declares_no_default_of_its_own() -> None:
    """Every default of ``autoglm serve`` is ServerOptions' or Limits' (one place declares them)."""
    from autoglm_inference.cli import serve_command
    from autoglm_inference.limits import Limits
    from autoglm_inference.options import ServerOptions

    defaults = {p.name: p.default for p in serve_command.params}
    server, limits = ServerOptions(), Limits()
    for name in (
        "host",
        "http_port",
        "max_batch_size",
        "max_batch_delay_ms",
        "stream_interval_ms",
        "device",
        "target",
        "cache_dir",
    ):
        assert defaults[name] == getattr(server, name), name
    assert defaults["continuous"] == server.continuous_batching
    for name in ("max_prompt_tokens", "max_new_tokens", "max_body_bytes", "max_queue"):
        assert defaults[name] == getattr(limits, name), name
