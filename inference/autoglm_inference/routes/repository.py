"""The model repository extension with parameters, under ``/v2/repository``: hot-swap what a name serves.

``POST models/NAME/load`` with ``{"parameters": {"uri": ..., "sha256": ..., "canaryWeight": ...}}``
(an atomic hot-swap, or a canary beside the stable revision), ``unload``, ``promote``,
``rollback``, ``weight`` (``{"parameters": {"canaryWeight": N}}``: move the canary's share) and
``GET|POST index``. They need the admin token (``AdminGuard``), or come from
loopback when there is none, and open only models under the model roots.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from autoglm_inference.kserve_model import CausalLMModel
from autoglm_inference.registry import Registry
from autoglm_inference.revisions import NoCanaryError
from autoglm_inference.routes.deps import json_body, registry_of, repository_of
from autoglm_inference.service import BadRequestError

SHA256 = re.compile(r"[0-9a-fA-F]{64}")
router = APIRouter(prefix="/v2/repository", tags=["repository"])


@router.api_route("/index", methods=["GET", "POST"])
async def index(registry: Annotated[Registry, Depends(registry_of)]) -> list[dict[str, Any]]:
    return [
        {"name": name, "state": "READY", "reason": "", **service.router.describe()}
        for name, service in sorted(registry.services.items())
    ]


@router.post("/models/{name}/load")
async def load(
    name: str,
    request: Request,
    registry: Annotated[Registry, Depends(registry_of)],
    repository: Annotated[Any, Depends(repository_of)],
) -> JSONResponse:
    body = await json_body(request)
    parameters = body.get("parameters") if isinstance(body, dict) else None
    if not isinstance(parameters, dict) or not isinstance(parameters.get("uri"), str):
        raise BadRequestError('the body must be {"parameters": {"uri": ARTIFACT_URI, "sha256": OPTIONAL}}')
    sha256 = parameters.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and SHA256.fullmatch(sha256)):
        raise BadRequestError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    weight = parameters.get("canaryWeight")
    if weight is not None and not (
        isinstance(weight, int | float) and not isinstance(weight, bool) and 0 <= weight <= 100
    ):
        raise BadRequestError(f"canaryWeight must be a number from 0 to 100, got {weight!r}")
    await asyncio.to_thread(registry.policy.check, parameters["uri"], cache_dir=registry.options.cache_dir)
    started = time.perf_counter()
    async with registry.exclusive(name, f"a load of {parameters['uri']}"):
        service = registry.services.get(name)
        if service is None:
            if weight is not None:
                raise NoCanaryError(f"{name} is not loaded: load a stable revision before a canary")
            model = CausalLMModel(name, parameters["uri"], registry, sha256=sha256)
            await asyncio.to_thread(model.load)
            repository.update(model)
            service = model.service
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


@router.post("/models/{name}/unload")
async def unload(
    name: str,
    registry: Annotated[Registry, Depends(registry_of)],
    repository: Annotated[Any, Depends(repository_of)],
) -> JSONResponse:
    async with registry.exclusive(name, "an unload"):
        service = registry.get(name)
        del registry.services[name]
        repository.models.pop(name, None)
        await service.router.close()
    return JSONResponse({"name": name, "unload": True})


@router.post("/models/{name}/promote")
async def promote(name: str, registry: Annotated[Registry, Depends(registry_of)]) -> JSONResponse:
    async with registry.exclusive(name, "a promotion"):
        service = registry.get(name)
        revision = service.router.promote()
    return JSONResponse({"name": name, "promoted": revision.name, **service.router.describe()})


@router.post("/models/{name}/rollback")
async def rollback(name: str, registry: Annotated[Registry, Depends(registry_of)]) -> JSONResponse:
    async with registry.exclusive(name, "a rollback"):
        service = registry.get(name)
        revision = service.router.rollback()
    return JSONResponse({"name": name, "rolledBack": revision.name, **service.router.describe()})


@router.post("/models/{name}/weight")
async def weight(
    name: str, request: Request, registry: Annotated[Registry, Depends(registry_of)]
) -> JSONResponse:
    """Move the canary to ``{"parameters": {"canaryWeight": 0..100}}`` percent of unpinned traffic."""
    body = await json_body(request)
    parameters = body.get("parameters") if isinstance(body, dict) else None
    value = parameters.get("canaryWeight") if isinstance(parameters, dict) else None
    if not (isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 100):
        raise BadRequestError(
            f'the body must be {{"parameters": {{"canaryWeight": 0..100}}}}, got {body!r}'[:300]
        )
    async with registry.exclusive(name, "a weight change"):
        service = registry.get(name)
        service.router.set_weight(float(value))
    return JSONResponse({"name": name, **service.router.describe()})
