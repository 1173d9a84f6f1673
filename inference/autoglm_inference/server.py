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
import contextlib
import json
import logging
import re
import sys
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from autoglm_core.energy import EnergyMeter
from autoglm_inference.access import AccessDeniedError, AdminGuard, ModelPolicy
from autoglm_inference.artifact import ArtifactError, LoadedArtifact
from autoglm_inference.engine import Engine
from autoglm_inference.limits import LimitError, QueueFullError
from autoglm_inference.middleware import (
    REQUEST_ID_HEADER,
    ClientGoneError,
    RequestGuard,
    count_stream_error,
    until_done_or_gone,
)
from autoglm_inference.options import ServerOptions
from autoglm_inference.prompts import PromptVariants, UnknownVariantError
from autoglm_inference.revisions import NoCanaryError, Router, SwapInProgressError, UnknownRevisionError
from autoglm_inference.service import (
    BadRequestError,
    GenerateRequest,
    Generation,
    GenerationError,
    LMService,
    UnavailableError,
)
from autoglm_inference.telemetry import Labels, telemetry
from autoglm_modeling.quantization import dequantized_kinds, quantized_kinds, run_activations_in_fp32

log = logging.getLogger(__name__)
SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def _energy_meter(device: torch.device) -> EnergyMeter:
    """NVML's counter of ``device`` when it is a GPU (found by its UUID), else RAPL or the CPU model."""
    if device.type != "cuda":
        return EnergyMeter()
    index = device.index or 0
    try:
        uuid: str | None = str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # an old driver or torch without the property: NVML's index instead
        uuid = None
    return EnergyMeter(gpu_index=index, gpu_uuid=uuid)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device; use cpu or auto")
    return device


@contextlib.contextmanager
def _own_argv() -> Iterator[None]:
    """kserve parses ``sys.argv`` when imported; keep our own flags away from its parser."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        yield
    finally:
        sys.argv = argv


# fastapi warns on every request that kserve's default ORJSONResponse is deprecated.
warnings.filterwarnings("ignore", message=".*ORJSONResponse is deprecated.*")
with _own_argv():
    import kserve.model_server
    from kserve.model import Model
    from kserve.model_repository import ModelRepository
    from kserve.model_server import ModelServer
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
    from kserve.protocol.rest.server import RESTServer


class _EngineObserver:
    def __init__(self, labels: Labels) -> None:
        self.labels = labels

    def on_prefill(self, size: int) -> None:
        telemetry().prefill_size.record(size, self.labels.attrs())

    def on_step(self, rows: int, seconds: float) -> None:
        telemetry().batch_size.record(rows, self.labels.attrs())


class Registry:
    """The served model names; shared by kserve's repository and our routes."""

    def __init__(self, options: ServerOptions, *, startup_uri: str | None = None) -> None:
        self.options = options
        self.policy = ModelPolicy.build(
            options.model_roots,
            cache_dir=options.cache_dir,
            startup_uri=startup_uri,
            allow_remote=options.allow_remote_models,
        )
        self.device = resolve_device(options.device)
        self.services: dict[str, LMService] = {}
        self.prompts = PromptVariants(options.prompt_variants)
        self.meter = _energy_meter(self.device)
        if self.device.type == "cuda" and self.meter.method != "nvml":
            log.warning(
                "no NVML energy counter for %s (pip install nvidia-ml-py): energy is CPU-time modelled",
                self.device,
            )
        # One decode step at a time on the device: each step's energy reading is then its own.
        self.step_lock = threading.Lock()
        self._busy: dict[str, str] = {}

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str, what: str) -> AsyncIterator[None]:
        """One repository operation per model name at a time; a second one gets 409."""
        if name in self._busy:
            raise SwapInProgressError(
                f"{name}: {self._busy[name]} is in progress; retry when it has finished"
            )
        self._busy[name] = what
        try:
            yield
        finally:
            del self._busy[name]

    def make_engine_for(self, name: str) -> Callable[[LoadedArtifact], Engine]:
        device = self.device

        def make(loaded: LoadedArtifact) -> Engine:
            if device.type == "cpu" and (swapped := run_activations_in_fp32(loaded.model)):
                log.info(
                    "%s: %d modules run with fp32 activations on AutoGLM's CPU kernel (no native half GEMM here)",
                    loaded.artifact.uri,
                    swapped,
                )
            if device.type != "cpu":
                try:
                    loaded.model.to(device)  # type: ignore[arg-type]
                except Exception as exc:  # e.g. CPU-only packed int4/int8 weights
                    raise ArtifactError(f"{loaded.artifact.uri}: cannot run on {device}: {exc}") from exc
            if slow := dequantized_kinds(quantized_kinds(loaded.model), device):
                log.warning(
                    "%s: %s run dequantized on %s (this torch has no kernel for them there): "
                    "smaller than bf16 but slower",
                    loaded.artifact.uri,
                    ", ".join(slow),
                    device,
                )
            labels = Labels(name, loaded.artifact.revision, "-", self.options.target)
            engine = Engine(
                loaded.model,
                max_batch_size=self.options.max_batch_size,
                max_batch_delay_ms=self.options.max_batch_delay_ms,
                max_queue=self.options.limits.max_queue,
                continuous=self.options.continuous_batching,
                meter=self.meter,
                observer=_EngineObserver(labels),
                name=f"{name}@{loaded.artifact.revision}",
                step_lock=self.step_lock,
            )
            key = id(engine)
            telemetry().watch_queue(key, labels, lambda: engine.queue_depth)
            engine.on_stop.append(lambda: telemetry().unwatch_queue(key))
            return engine

        return make

    def create(self, name: str, uri: str, sha256: str | None = None) -> LMService:
        router = Router.load_first(
            name, uri, sha256=sha256, make_engine=self.make_engine_for(name), cache_dir=self.options.cache_dir
        )
        service = LMService(
            name, router, prompts=self.prompts, limits=self.options.limits, target=self.options.target
        )
        self.services[name] = service
        return service

    def get(self, name: str) -> LMService:
        service = self.services.get(name)
        if service is None:
            raise UnknownRevisionError(f"model {name!r} is not served; served: {sorted(self.services)}")
        return service


class CausalLMModel(Model):
    """KServe V1 and V2 inference for one served name; generation goes through ``LMService``."""

    def __init__(self, service: LMService) -> None:
        super().__init__(service.name, return_response_headers=True)
        self.service = service
        self.ready = True

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [
            {"name": "text_output", "datatype": "BYTES", "shape": [-1]},
            {"name": "finish_reason", "datatype": "BYTES", "shape": [-1]},
            {"name": "completion_tokens", "datatype": "INT64", "shape": [-1]},
        ]

    async def predict(
        self,
        payload: dict[str, Any] | InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | InferResponse:
        received = time.perf_counter()  # latency starts here, before tokenizing
        headers = dict(headers or {})
        if isinstance(payload, InferRequest):
            return await self._predict_v2(payload, headers, response_headers, received)
        if isinstance(payload, bytes):  # kserve passes bodies with other content types through raw
            try:
                payload = json.loads(payload)
            except ValueError as exc:
                raise BadRequestError(f"the body is not valid JSON: {exc}") from exc
        if (
            not isinstance(payload, dict)
            or not isinstance(payload.get("instances"), list)
            or not payload["instances"]
        ):
            raise BadRequestError(
                'the V1 body must be {"instances": [{"prompt": TEXT, "max_tokens": N}, ...]}'
            )
        requests = [GenerateRequest.from_json(i) for i in payload["instances"]]
        results = await self._run_all(requests, headers, response_headers, received)
        return {"predictions": [r.to_json() for r in results]}

    async def _predict_v2(
        self,
        payload: InferRequest,
        headers: dict[str, str],
        response_headers: dict[str, str] | None,
        received: float,
    ) -> InferResponse:
        texts: list[str] | None = None
        for infer_input in payload.inputs:
            if infer_input.name in ("text_input", "prompt"):
                texts = [_text(t) for t in infer_input.data]
        if not texts:
            raise BadRequestError('the V2 request needs a BYTES input named "text_input"')
        parameters = {k: _plain(v) for k, v in (payload.parameters or {}).items()}
        requests = [GenerateRequest.from_json({**parameters, "prompt": t}) for t in texts]
        results = await self._run_all(requests, headers, response_headers, received)
        outputs = [
            InferOutput("text_output", [len(results)], "BYTES", data=[r.text for r in results]),
            InferOutput("finish_reason", [len(results)], "BYTES", data=[r.finish_reason for r in results]),
            InferOutput(
                "completion_tokens", [len(results)], "INT64", data=[r.completion_tokens for r in results]
            ),
        ]
        first = results[0]
        return InferResponse(
            response_id=payload.id or first.request_id,
            model_name=self.name,
            model_version=first.revision,
            infer_outputs=outputs,
            parameters={"revision": first.revision, "prompt_variant": first.prompt_variant},
        )

    async def _run_all(
        self,
        requests: list[GenerateRequest],
        headers: dict[str, str],
        response_headers: dict[str, str] | None,
        received: float,
    ) -> list[Any]:
        """Every instance of one request, on one revision, batched; cancelled if the client leaves."""
        request_id = headers.get(REQUEST_ID_HEADER) or str(uuid.uuid4())
        generations: list[Generation] = []
        try:
            for index, request in enumerate(requests):
                if generations:
                    request.revision = generations[0].revision.name
                # Each instance has its own id (feedback joins on it): the request's, then "/1", "/2"...
                instance_id = request_id if index == 0 else f"{request_id}/{index}"
                generations.append(
                    await self.service.start_async(
                        request, {**headers, REQUEST_ID_HEADER: instance_id}, received=received
                    )
                )
            results = await until_done_or_gone(asyncio.gather(*(g.result() for g in generations)))
        finally:
            for g in generations:
                g.close()
        if response_headers is not None:
            response_headers.update(generations[0].headers())
        return list(results)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise BadRequestError(f"text_input must hold strings (BYTES), got {value!r}")
    return value


def _plain(value: Any) -> Any:
    """V2 parameters arrive as plain values or as InferParameter-like wrappers."""
    for attr in ("int64_param", "double_param", "string_param", "bool_param"):
        if hasattr(value, attr):
            return getattr(value, attr)
    return value


# -- our routes ----------------------------------------------------------------------------------


def install_routes(app: FastAPI, registry: Registry, repository: Any) -> None:
    limits = registry.options.limits
    # Added first, so it runs inside RequestGuard: its refusals get request ids and are counted.
    app.add_middleware(AdminGuard, token=registry.options.admin_token)
    app.add_middleware(RequestGuard, max_body_bytes=limits.max_body_bytes, target=registry.options.target)

    def error_response(status: int, message: str, **headers: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)

    async def on_limit(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, LimitError)
        response = JSONResponse(exc.to_json(), status_code=exc.status)
        if isinstance(exc, QueueFullError):
            response.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return response

    async def on_error(_request: Request, exc: Exception) -> JSONResponse:
        status = int(getattr(exc, "status", 400))
        if status == 503:
            return error_response(status, str(exc), **{"Retry-After": "1"})
        return error_response(status, str(exc))

    async def on_client_gone(_request: Request, _exc: Exception) -> JSONResponse:
        return error_response(499, "the client closed the connection")  # nobody reads it

    app.add_exception_handler(LimitError, on_limit)
    app.add_exception_handler(ClientGoneError, on_client_gone)
    for kind in (
        BadRequestError,
        UnknownVariantError,
        UnknownRevisionError,
        NoCanaryError,
        ArtifactError,
        SwapInProgressError,
        GenerationError,
        UnavailableError,
        AccessDeniedError,
    ):
        app.add_exception_handler(kind, on_error)

    async def read_json(request: Request) -> Any:
        try:
            return json.loads(await request.body() or b"{}")
        except ValueError as exc:
            raise BadRequestError(f"the body is not valid JSON: {exc}") from exc

    # -- OpenAI-compatible ----------------------------------------------------------------------

    def openai_service(body: Any) -> LMService:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise BadRequestError("'model' (the served model name) is required")
        if body.get("n") not in (None, 1):
            raise BadRequestError(f"'n' must be 1 (one choice per request), got {body.get('n')!r}")
        return registry.get(body["model"])

    @app.get("/openai/v1/models")
    async def openai_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "owned_by": "autoglm"} for n in sorted(registry.services)],
        }

    @app.post("/openai/v1/completions")
    async def completions(request: Request) -> Any:
        received = time.perf_counter()  # latency starts here, before tokenizing
        body = await read_json(request)
        service = openai_service(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequestError("'prompt' must be one string")
        generation = await service.start_async(
            GenerateRequest.from_json({**body, "prompt": prompt}), dict(request.headers), received=received
        )
        return await openai_reply(generation, body, chat=False)

    @app.post("/openai/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        received = time.perf_counter()
        body = await read_json(request)
        service = openai_service(body)
        if "max_completion_tokens" in body and "max_tokens" not in body:
            body["max_tokens"] = body["max_completion_tokens"]
        generation = await service.start_async(
            GenerateRequest.from_json({k: v for k, v in body.items() if k != "prompt"}),
            dict(request.headers),
            received=received,
        )
        return await openai_reply(generation, body, chat=True)

    async def openai_reply(generation: Generation, body: dict[str, Any], *, chat: bool) -> Any:
        created = int(time.time())
        ident = ("chatcmpl-" if chat else "cmpl-") + generation.request_id
        base = {"id": ident, "created": created, "model": generation.service.name}
        if not body.get("stream"):
            try:
                result = await until_done_or_gone(generation.result())
            finally:
                generation.close()
            choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": result.text}
            else:
                choice.update(text=result.text, logprobs=None)
            usage = {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            }
            payload = {
                **base,
                "object": "chat.completion" if chat else "text_completion",
                "choices": [choice],
                "usage": usage,
            }
            return JSONResponse(payload, headers=generation.headers())

        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(data: dict[str, Any]) -> str:
            return f"data: {json.dumps(data)}\n\n"

        def chunk(delta: str | None, finish: str | None) -> str:
            if chat:
                choice = {
                    "index": 0,
                    "delta": {"content": delta} if delta is not None else {},
                    "finish_reason": finish,
                }
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return event({**base, "object": obj, "choices": [choice]})

        # Wait for the first text before the status line goes out, so a request that fails before it
        # produced anything (unloaded while queued, a failed prefill) gets its real status code.
        deltas = generation.deltas()
        try:
            first_delta: str | None = await until_done_or_gone(anext(deltas))
        except StopAsyncIteration:
            first_delta = None
        except BaseException:
            generation.close()
            raise

        async def events() -> AsyncIterator[str]:
            try:
                if chat:
                    first = {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
                    yield event({**base, "object": obj, "choices": [first]})
                if first_delta is not None:
                    yield chunk(first_delta, None)
                    async for delta in deltas:
                        yield chunk(delta, None)
                yield chunk(None, generation.finish_reason or "stop")
                yield "data: [DONE]\n\n"
            except (GenerationError, UnavailableError) as exc:  # the status line is gone: say it in-band
                count_stream_error(generation.labels.attrs(), exc.status)
                yield event({"error": {"message": str(exc), "code": exc.status}})
            finally:
                generation.close()

        return StreamingResponse(events(), media_type="text/event-stream", headers=generation.headers())

    # -- model repository extension with parameters ----------------------------------------------

    async def index(_request: Request) -> list[dict[str, Any]]:
        return [
            {"name": name, "state": "READY", "reason": "", **service.router.describe()}
            for name, service in sorted(registry.services.items())
        ]

    app.add_api_route("/v2/repository/index", index, methods=["GET", "POST"])

    @app.post("/v2/repository/models/{name}/load")
    async def load(name: str, request: Request) -> JSONResponse:
        body = await read_json(request)
        parameters = body.get("parameters") if isinstance(body, dict) else None
        if not isinstance(parameters, dict) or not isinstance(parameters.get("uri"), str):
            raise BadRequestError(
                'the body must be {"parameters": {"uri": ARTIFACT_URI, "sha256": OPTIONAL}}'
            )
        sha256 = parameters.get("sha256")
        if sha256 is not None and not (isinstance(sha256, str) and SHA256.fullmatch(sha256)):
            raise BadRequestError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
        weight = parameters.get("canaryWeight")
        if weight is not None and not (
            isinstance(weight, int | float) and not isinstance(weight, bool) and 0 <= weight <= 100
        ):
            raise BadRequestError(f"canaryWeight must be a number from 0 to 100, got {weight!r}")
        await asyncio.to_thread(
            registry.policy.check, parameters["uri"], cache_dir=registry.options.cache_dir
        )
        started = time.perf_counter()
        async with registry.exclusive(name, f"a load of {parameters['uri']}"):
            service = registry.services.get(name)
            if service is None:
                if weight is not None:
                    raise NoCanaryError(f"{name} is not loaded: load a stable revision before a canary")
                service = await asyncio.to_thread(registry.create, name, parameters["uri"], sha256)
                repository.update(CausalLMModel(service))
                revision = service.router.table.stable
            else:
                revision = await service.router.swap(parameters["uri"], sha256=sha256, canary_weight=weight)
        return JSONResponse(
            {
                "name": name,
                "load": True,
                "revision": revision.name,
                "sha256": revision.loaded.artifact.digest,
                "role": "canary" if weight is not None else "stable",
                "seconds": round(time.perf_counter() - started, 3),
                **service.router.describe(),
            }
        )

    @app.post("/v2/repository/models/{name}/unload")
    async def unload(name: str) -> JSONResponse:
        async with registry.exclusive(name, "an unload"):
            service = registry.get(name)
            del registry.services[name]
            repository.models.pop(name, None)
            await service.router.close()
        return JSONResponse({"name": name, "unload": True})

    @app.post("/v2/repository/models/{name}/promote")
    async def promote(name: str) -> JSONResponse:
        async with registry.exclusive(name, "a promotion"):
            service = registry.get(name)
            revision = service.router.promote()
        return JSONResponse({"name": name, "promoted": revision.name, **service.router.describe()})

    @app.post("/v2/repository/models/{name}/rollback")
    async def rollback(name: str) -> JSONResponse:
        async with registry.exclusive(name, "a rollback"):
            service = registry.get(name)
            revision = service.router.rollback()
        return JSONResponse({"name": name, "rolledBack": revision.name, **service.router.describe()})


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
    service = registry.create(name, uri, sha256)
    repository = ModelRepository()
    server = ModelServer(
        http_port=options.http_port,
        enable_grpc=False,
        workers=1,
        registered_models=repository,
        enable_latency_logging=False,
    )
    install_routes(kserve.model_server.app, registry, repository)
    _LoopbackAwareREST.host = options.host
    kserve.model_server.RESTServer = _LoopbackAwareREST  # type: ignore[attr-defined]  # it hard-codes 0.0.0.0
    model = CausalLMModel(service)
    log.info(
        "serving %s revision %s on %s:%d; repository routes: %s; load may open %s",
        name,
        service.router.table.stable.name,
        options.host,
        options.http_port,
        "bearer token" if options.admin_token else "loopback clients only",
        registry.policy.describe(),
    )
    server.start([model])
