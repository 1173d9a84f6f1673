"""KServe's V1 and Open Inference V2 protocols for one served name: our ``kserve.Model``.

``load()`` resolves, verifies and loads the artifact (as KServe's model servers do), so a name
added through the repository routes is loaded the same way as the one given at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

from autoglm_inference.middleware import REQUEST_ID_HEADER, until_done_or_gone
from autoglm_inference.registry import Registry
from autoglm_inference.service import (
    BadRequestError,
    GenerateRequest,
    Generation,
    LMService,
    UnavailableError,
)


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


__all__ = ["CausalLMModel", "ModelRepository", "ModelServer", "RESTServer", "kserve"]


class CausalLMModel(Model):
    """KServe V1 and V2 inference for one served name; generation goes through ``LMService``.

    Nothing is registered until ``load()`` succeeds.
    """

    def __init__(self, name: str, uri: str, registry: Registry, *, sha256: str | None = None) -> None:
        super().__init__(name, return_response_headers=True)
        self.uri = uri
        self.sha256 = sha256
        self.registry = registry
        self._service: LMService | None = None

    def load(self) -> bool:
        """Resolve, verify and load the artifact into the registry (raises ArtifactError naming why not)."""
        self._service = self.registry.create(self.name, self.uri, self.sha256)
        self.ready = True
        return self.ready

    @property
    def service(self) -> LMService:
        if self._service is None:
            raise UnavailableError(f"model {self.name!r} is not loaded yet")
        return self._service

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
