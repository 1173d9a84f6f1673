"""What every route gets from the app: the registry, kserve's model repository, the JSON body."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request

from autoglm_inference.registry import Registry
from autoglm_inference.service import BadRequestError


def attach(app: FastAPI, registry: Registry, repository: Any) -> None:
    """Make ``registry`` and kserve's ``repository`` the ones this app's routes use."""
    app.state.autoglm_registry = registry
    app.state.autoglm_repository = repository


def registry_of(request: Request) -> Registry:
    registry: Registry = request.app.state.autoglm_registry
    return registry


def repository_of(request: Request) -> Any:
    return request.app.state.autoglm_repository


async def json_body(request: Request) -> Any:
    """The request body as JSON (an empty body is ``{}``); 400 naming the parse error otherwise."""
    try:
        return json.loads(await request.body() or b"{}")
    except ValueError as exc:
        raise BadRequestError(f"the body is not valid JSON: {exc}") from exc
