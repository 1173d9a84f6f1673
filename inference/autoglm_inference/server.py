"""The KServe model server for causal LMs: ``autoglm serve``.

A real ``kserve.ModelServer`` with our ``kserve.Model`` subclass, so the same process runs under
an InferenceService. Routes:

- KServe V1 ``POST /v1/models/NAME:predict`` and Open Inference Protocol V2
  ``POST /v2/models/NAME/infer``, ready and metadata (kserve's own endpoints, our model);
- OpenAI-compatible ``POST /openai/v1/completions`` and ``/openai/v1/chat/completions`` with
  ``stream: true`` as server-sent events, and ``GET /openai/v1/models``. kserve's own OpenAI routes
  need vLLM and only see models present at start-up, so these are ours;
- the model repository extension with parameters: ``POST /v2/repository/models/NAME/load`` with
  ``{"parameters": {"uri": ..., "sha256": ..., "canaryWeight": ...}}`` (an atomic hot-swap),
  ``.../unload``, ``.../promote``, ``.../rollback`` and ``GET|POST /v2/repository/index``;
- ``/metrics``: kserve's Prometheus registry, which also carries our OpenTelemetry instruments.

Every response carries ``x-request-id``; generation responses also carry ``x-autoglm-revision``
and ``x-autoglm-prompt-variant``, so feedback can be joined to what produced the answer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from autoglm_core.errors import AutoGLMError
from autoglm_inference.access import AdminGuard
from autoglm_inference.faults import MetricsDown
from autoglm_inference.kserve_model import CausalLMModel, ModelRepository, ModelServer, RESTServer, kserve
from autoglm_inference.middleware import ClientGoneError, RequestGuard
from autoglm_inference.options import EventLoopChoice, ServerOptions
from autoglm_inference.registry import Registry
from autoglm_inference.routes import openai, repository
from autoglm_inference.routes.deps import attach
from autoglm_inference.routes.feedback import FeedbackEndpoint

__all__ = ["Registry", "ServerOptions", "install_routes", "serve"]

log = logging.getLogger(__name__)


async def _on_error(_request: Request, exc: Exception) -> JSONResponse:
    """Every AutoGLM error as ``{"error": ...}`` with its own status (and headers, e.g. Retry-After)."""
    assert isinstance(exc, AutoGLMError)
    return JSONResponse(exc.to_json(), status_code=exc.status, headers=exc.headers() or None)


async def _on_client_gone(_request: Request, _exc: Exception) -> JSONResponse:
    return JSONResponse({"error": "the client closed the connection"}, status_code=499)  # nobody reads it


def install_routes(app: FastAPI, registry: Registry, model_repository: Any) -> None:
    """Our middleware, error mapping and routers on kserve's app (which already has V1 and V2)."""
    limits = registry.options.limits
    # Added first, so it runs inside RequestGuard: its refusals get request ids and are counted.
    app.add_middleware(AdminGuard, token=registry.options.admin_token)
    app.add_middleware(RequestGuard, max_body_bytes=limits.max_body_bytes, target=registry.options.target)
    if registry.faults is not None:  # tests only: outermost, so /metrics can be taken down
        app.add_middleware(MetricsDown, faults=registry.faults)
    app.add_exception_handler(AutoGLMError, _on_error)
    app.add_exception_handler(ClientGoneError, _on_client_gone)
    attach(app, registry, model_repository)
    app.include_router(openai.router)
    app.include_router(repository.router)
    if registry.feedback is not None:
        FeedbackEndpoint(registry.feedback, registry.request_log, registry.options.feedback_token).attach(app)


class _LoopbackAwareREST(RESTServer):
    host = "0.0.0.0"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = self.host


def serve(name: str, uri: str, options: ServerOptions, *, sha256: str | None = None) -> None:
    """Load ``uri`` as ``name`` and serve until SIGTERM/SIGINT."""
    if options.threads:
        torch.set_num_threads(options.threads)
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    registry = Registry(options, startup_uri=uri)
    model = CausalLMModel(name, uri, registry, sha256=sha256)
    model.load()
    model_repository = ModelRepository()
    server = ModelServer(
        http_port=options.http_port,
        enable_grpc=False,
        workers=1,
        registered_models=model_repository,
        enable_latency_logging=False,
    )
    install_routes(kserve.model_server.app, registry, model_repository)
    _LoopbackAwareREST.host = options.host
    kserve.model_server.RESTServer = _LoopbackAwareREST  # type: ignore[attr-defined]  # it hard-codes 0.0.0.0
    loop = use_event_loop(options.event_loop)
    log.info(
        "serving %s revision %s on %s:%d (%s); repository routes: %s; load may open %s",
        name,
        model.service.router.table.stable.name,
        options.host,
        options.http_port,
        loop,
        "bearer token" if options.admin_token else "loopback clients only",
        registry.policy.describe(),
    )
    server.start([model])


def use_event_loop(choice: EventLoopChoice) -> str:
    """Make ``choice`` the loop ``asyncio.run`` creates (kserve's ``start`` runs its servers so,
    which is why its own ``--event-loop`` setting never reaches uvicorn); returns the one in use.

    uvloop: its transports and callbacks are C, so each streamed token costs the event loop's thread
    less CPU, and on a CPU that thread shares the cores with the decode (measured here: about 40 us
    less per token through the OpenAI stream, ``bench/runtime.py``)."""
    if choice == "asyncio":
        asyncio.set_event_loop_policy(None)
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError("--event-loop uvloop: uvloop is not installed (pip install uvloop)") from None
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # kserve's start() asks for the current loop before asyncio.run makes its own: give it one.
    asyncio.set_event_loop(asyncio.new_event_loop())
    return "uvloop"
