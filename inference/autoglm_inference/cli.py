"""``autoglm serve`` (also ``python -m autoglm_inference``): the KServe model server for one causal LM.

Its defaults are :class:`~autoglm_inference.options.ServerOptions`' and
:class:`~autoglm_inference.limits.Limits`'; nothing is declared twice.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import click

from autoglm_inference.limits import Limits
from autoglm_inference.options import (
    ADMIN_TOKEN_ENV,
    FEEDBACK_TOKEN_ENV,
    MAX_STREAM_INTERVAL_MS,
    EngineChoice,
    EventLoopChoice,
    ServerOptions,
)

_SERVER = ServerOptions()
_LIMITS = Limits()


@click.command("serve")
@click.option(
    "--model-name", required=True, help="Name the model is served under (V1/V2 path, OpenAI 'model')."
)
@click.option(
    "--model-uri", required=True, help="Artifact to serve: a folder, file://, pvc://, s3://, gs://, hf://."
)
@click.option(
    "--sha256", default=None, help="Expected SHA-256 of the artifact's model card; refuse anything else."
)
@click.option("--host", default=_SERVER.host, show_default=True,
              help="Address to listen on; a container or pod sets 0.0.0.0.")  # fmt: skip
@click.option("--http-port", type=click.IntRange(1, 65535), default=_SERVER.http_port, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(1, 256), default=_SERVER.max_batch_size, show_default=True,
              help="Requests decoded together; 1 turns batching off.")  # fmt: skip
@click.option("--max-batch-delay-ms", type=click.FloatRange(0, 10_000), default=_SERVER.max_batch_delay_ms, show_default=True,
              help="How long an idle server waits for more requests before it starts a batch.")  # fmt: skip
@click.option("--continuous/--no-continuous", default=_SERVER.continuous_batching, show_default=True,
              help="Let new requests join a running batch between decode steps.")  # fmt: skip
@click.option("--stream-interval-ms", type=click.FloatRange(0, MAX_STREAM_INTERVAL_MS), default=_SERVER.stream_interval_ms,
              show_default=True, help="Hand streamed tokens to the HTTP side at most this often, several per event "
                                      "(the first token and the end at once). 0: an event per token. On a CPU whose "
                                      "every core decodes, each event costs decode time.")  # fmt: skip
@click.option("--max-queue", type=click.IntRange(1), default=_LIMITS.max_queue, show_default=True,
              help="Requests that may wait for a batch slot; more get 429 with Retry-After.")  # fmt: skip
@click.option(
    "--max-prompt-tokens", type=click.IntRange(1), default=_LIMITS.max_prompt_tokens, show_default=True
)
@click.option("--max-new-tokens", type=click.IntRange(1), default=_LIMITS.max_new_tokens, show_default=True)
@click.option("--max-body-bytes", type=click.IntRange(1), default=_LIMITS.max_body_bytes, show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=None,
    help="CPU threads of the runtime (default: torch's choice; llama.cpp: the CPUs this process may use).",
)
@click.option("--engine", type=click.Choice(["auto", "torch", "llama.cpp"]), default=_SERVER.engine, show_default=True,
              help="The runtime: auto serves GGUF weights (a published llama.cpp variant, a .gguf file) on "
                   "llama.cpp when llama-cpp-python is installed and the device is the CPU, everything else on torch.")  # fmt: skip
@click.option("--event-loop", type=click.Choice(["auto", "asyncio", "uvloop"]), default=_SERVER.event_loop,
              show_default=True, help="The HTTP server's event loop: auto is uvloop when installed (each streamed "
                                      "token costs the server's thread less CPU, which a CPU decode shares).")  # fmt: skip
@click.option("--device", default=_SERVER.device, show_default=True,
              help="cpu, cuda, cuda:N, or auto (cuda when torch sees one). Energy on a GPU comes from NVML.")  # fmt: skip
@click.option(
    "--target",
    default=_SERVER.target,
    show_default=True,
    help="Pool label on metrics: cloud-gpu, edge, local.",
)
@click.option("--prompt-variants", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="YAML/JSON file naming the active system-prompt variant; re-read when it changes.")  # fmt: skip
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=_SERVER.cache_dir,
              show_default=True, help="GGUF conversions and downloads; always a model root.")  # fmt: skip
@click.option("--admin-token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="File holding the bearer token the /v2/repository routes (load, unload, promote, rollback, "
                   f"index) require; else ${ADMIN_TOKEN_ENV}. With neither, those routes answer only to "
                   "loopback clients. Inference routes are open.")  # fmt: skip
@click.option("--model-root", "model_roots", multiple=True, metavar="PATH|pkg://PACKAGE",
              help="Repeatable. Where a repository load may open models: paths (symlinks and '..' resolved) "
                   "must stay inside one. Default: the folder holding --model-uri. The cache dir is always one, "
                   "and --model-uri itself may always be loaded again.")  # fmt: skip
@click.option("--allow-remote-models", is_flag=True, default=False,
              help="Let a repository load fetch http(s)://, s3:// and gs:// URIs (off: only local roots).")  # fmt: skip
@click.option("--feedback-url", default=None, metavar="URL", envvar="AUTOGLM_FEEDBACK_URL", show_envvar=True,
              help="The feedback store (SQLAlchemy URL: sqlite:///PATH, postgresql://...): every answered request is "
                   "logged there and POST /v1/feedback rates them. Default: neither.")  # fmt: skip
@click.option("--feedback-token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help=f"File holding the bearer token POST /v1/feedback requires; else ${FEEDBACK_TOKEN_ENV}. With "
                   "neither, it answers only to loopback clients.")  # fmt: skip
@click.option("--request-log-max", type=click.IntRange(1), default=_SERVER.request_log_max, show_default=True,
              help="Request records the feedback store keeps (the newest).")  # fmt: skip
@click.option("--test-faults", type=click.Path(dir_okay=False, path_type=Path), default=None, hidden=True,
              help="Tests only (refused unless AUTOGLM_ENABLE_TEST_FAULTS=1): per-revision injected faults.")  # fmt: skip
def serve_command(
    model_name: str,
    model_uri: str,
    sha256: str | None,
    host: str,
    http_port: int,
    max_batch_size: int,
    max_batch_delay_ms: float,
    continuous: bool,
    stream_interval_ms: float,
    max_queue: int,
    max_prompt_tokens: int,
    max_new_tokens: int,
    max_body_bytes: int,
    threads: int | None,
    engine: str,
    event_loop: str,
    device: str,
    target: str,
    prompt_variants: Path | None,
    cache_dir: Path,
    admin_token_file: Path | None,
    model_roots: tuple[str, ...],
    allow_remote_models: bool,
    feedback_url: str | None,
    feedback_token_file: Path | None,
    request_log_max: int,
    test_faults: Path | None,
) -> None:
    """Serve MODEL_URI over KServe V1, Open Inference V2 and OpenAI-compatible routes.

    The /v2/repository routes hot-swap what is served: they need the admin token, or come from
    loopback when there is none, and load only models under the model roots.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from autoglm_inference.access import AccessDeniedError, admin_token
    from autoglm_inference.artifact import ArtifactError
    from autoglm_inference.server import serve

    try:
        options = ServerOptions(
            host=host,
            http_port=http_port,
            max_batch_size=max_batch_size,
            max_batch_delay_ms=max_batch_delay_ms,
            continuous_batching=continuous,
            stream_interval_ms=stream_interval_ms,
            threads=threads,
            target=target,
            cache_dir=cache_dir,
            limits=Limits(max_prompt_tokens, max_new_tokens, max_body_bytes, max_queue),
            prompt_variants=prompt_variants,
            device=device,
            engine=cast(EngineChoice, engine),  # click.Choice checked it
            event_loop=cast(EventLoopChoice, event_loop),
            admin_token=admin_token(admin_token_file),
            model_roots=model_roots,
            allow_remote_models=allow_remote_models,
            test_faults=test_faults,
            feedback_url=feedback_url,
            feedback_token=admin_token(feedback_token_file, env=FEEDBACK_TOKEN_ENV, role="feedback"),
            request_log_max=request_log_max,
        )
        serve(model_name, model_uri, options, sha256=sha256)
    except (ArtifactError, AccessDeniedError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


def main() -> None:
    """``python -m autoglm_inference``: the server alone, as a container or a supervisor starts it."""
    serve_command(prog_name="python -m autoglm_inference")
