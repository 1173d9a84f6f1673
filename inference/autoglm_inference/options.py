"""What ``autoglm serve`` can be told, with its defaults: the one place they are declared.

Torch-free, so the command line reads its defaults (and ``--help`` prints them) without loading
the model libraries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from autoglm_core.feedback.store import DEFAULT_MAX_REQUESTS
from autoglm_core.paths import DEFAULT_CACHE_DIR
from autoglm_inference.limits import Limits

#: ``--engine``: the runtime, or ``auto`` (chosen from the artifact and the device).
EngineChoice = Literal["auto", "torch", "llama.cpp"]

#: ``--event-loop``: uvicorn's choices; ``auto`` is uvloop when it is installed, else asyncio's own.
EventLoopChoice = Literal["auto", "asyncio", "uvloop"]

#: The environment variable holding the repository routes' bearer token.
ADMIN_TOKEN_ENV: Final = "AUTOGLM_ADMIN_TOKEN"
#: The environment variable holding the feedback writers' bearer token.
FEEDBACK_TOKEN_ENV: Final = "AUTOGLM_FEEDBACK_TOKEN"
#: The longest ``--stream-interval-ms`` (the chart's ``runtimes.*.streamIntervalMs`` too).
MAX_STREAM_INTERVAL_MS: Final = 1000


def stream_interval_args(interval_ms: float) -> tuple[str, ...]:
    """The ``autoglm serve`` arguments for a stream interval, as the operator's runtimes and
    ``autoglm run`` pass them: none for 0 (an event per token, the server's default); a value outside
    0 to ``MAX_STREAM_INTERVAL_MS`` is refused here, before any server is started with it."""
    if not 0 <= interval_ms <= MAX_STREAM_INTERVAL_MS:
        raise ValueError(
            f"stream_interval_ms must be 0 to {MAX_STREAM_INTERVAL_MS} (0: an event per token), got {interval_ms}"
        )
    return (f"--stream-interval-ms={interval_ms:g}",) if interval_ms > 0 else ()


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"  # a container or chart sets 0.0.0.0 explicitly
    http_port: int = 8080
    max_batch_size: int = 8
    max_batch_delay_ms: float = 10.0
    continuous_batching: bool = True
    #: Streamed tokens are handed to the HTTP side at most this often (ms); 0: each token at once.
    stream_interval_ms: float = 0.0
    threads: int | None = None
    target: str = "local"
    cache_dir: Path = DEFAULT_CACHE_DIR
    limits: Limits = field(default_factory=Limits)
    prompt_variants: Path | None = None
    device: str = "cpu"  # cpu, cuda, cuda:N or auto (cuda when one is visible)
    #: The runtime: ``auto`` picks llama.cpp for GGUF weights on a CPU (when installed), else torch.
    engine: EngineChoice = "auto"
    event_loop: EventLoopChoice = "auto"
    #: Bearer token of the repository routes; None: they answer only to loopback clients.
    admin_token: str | None = field(default=None, repr=False)
    #: Where ``load`` may open models (paths, file:// or pkg://); empty: the start-up model's folder.
    model_roots: tuple[str, ...] = ()
    allow_remote_models: bool = False  # http(s)://, s3://, gs:// in load
    #: The feedback store (a SQLAlchemy URL): the request log and ``POST /v1/feedback``. None: neither.
    feedback_url: str | None = None
    #: Bearer token of ``POST /v1/feedback``; None: it answers only to loopback clients.
    feedback_token: str | None = field(default=None, repr=False)
    #: Request records the log keeps (the newest).
    request_log_max: int = DEFAULT_MAX_REQUESTS
    #: Tests only (``autoglm_inference.faults``): per-revision injected latency, errors and energy.
    test_faults: Path | None = None
