"""``POST /v1/feedback``: users rate answers by their ``x-request-id``.

One event (``{"request_id": ..., "score": "up"}``) or a batch (``{"feedback": [...]}``, at most
1000). Writers need the feedback token (``Authorization: Bearer``), or come from loopback when the
server has none. Each event is joined to the request it rates in the request log and stored once
per (request_id, source) before the answer: a single event answers 200 (accepted, or duplicate:
the first rating stays), 404 when the request is unknown; a batch answers 200 with each event's
status. Accepted scores are observed on ``autoglm_feedback_score`` per model, revision, prompt
variant and target, the series the canary's ``minFeedbackScore`` gate reads.

The model server mounts this router when it has a feedback store (``--feedback-url``);
``autoglm feedback serve`` runs it alone on the same store.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from autoglm_core.feedback.records import Accepted, parse_feedback
from autoglm_core.feedback.store import FeedbackStore, RequestLog
from autoglm_inference.access import AccessDeniedError, authorize
from autoglm_inference.options import FEEDBACK_TOKEN_ENV
from autoglm_inference.routes.deps import json_body
from autoglm_inference.telemetry import telemetry

router = APIRouter()


@dataclass
class FeedbackEndpoint:
    """What the route writes to: the store, the local request log (flushed before a join, so an
    answer rated at once is found) and the writers' token."""

    store: FeedbackStore
    request_log: RequestLog | None = None
    token: str | None = None

    def attach(self, app: FastAPI) -> None:
        app.state.autoglm_feedback = self
        app.include_router(router)

    def accept(self, body: Any) -> list[Accepted]:
        events = parse_feedback(body)
        if self.request_log is not None:
            self.request_log.flush()
        results = self.store.accept(events)
        for result in results:
            if result.status == "accepted" and result.score is not None:
                telemetry().feedback_score.record(
                    result.score,
                    {"model": result.model or "", "revision": result.revision or "",
                     "prompt_variant": result.prompt_variant or "", "target": result.target or ""},
                )  # fmt: skip
        return results


def endpoint_of(request: Request) -> FeedbackEndpoint:
    endpoint: FeedbackEndpoint = request.app.state.autoglm_feedback
    client = request.client
    try:
        authorize(
            request.headers.get("authorization"), client.host if client else None, endpoint.token,
            routes="POST /v1/feedback", configure=f"--feedback-token-file or {FEEDBACK_TOKEN_ENV}",
            role="feedback",
        )  # fmt: skip
    except AccessDeniedError as exc:
        if exc.status == 401:
            raise _UnauthorizedError(str(exc)) from None
        raise
    return endpoint


class _UnauthorizedError(AccessDeniedError):
    default_status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


@router.post("/v1/feedback")
async def feedback(
    request: Request, endpoint: Annotated[FeedbackEndpoint, Depends(endpoint_of)]
) -> JSONResponse:
    body = await json_body(request)
    results = await asyncio.to_thread(endpoint.accept, body)
    if not (isinstance(body, dict) and "feedback" in body):
        (result,) = results
        if result.status == "unknown_request":
            return JSONResponse(
                {"error": f"request {result.request_id!r} is unknown here: it was not answered by a server "
                 "writing to this feedback store, or the request log no longer keeps it"},
                status_code=404,
            )  # fmt: skip
        return JSONResponse(result.to_json())
    counts = Counter(r.status for r in results)
    return JSONResponse({
        "accepted": counts["accepted"], "duplicate": counts["duplicate"],
        "unknown_request": counts["unknown_request"], "results": [r.to_json() for r in results],
    })  # fmt: skip


def feedback_app(store: FeedbackStore, token: str | None, *, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The feedback API alone (``autoglm feedback serve``): ``POST /v1/feedback``, ``GET /healthz``
    and ``/metrics`` (the feedback scores, for a Prometheus that scrapes it beside the servers).
    Bodies over ``max_body_bytes`` (1 MiB: a full batch with corrections fits) get 413, as the
    model server's do."""
    from prometheus_client import make_asgi_app

    from autoglm_core.errors import AutoGLMError
    from autoglm_inference.middleware import RequestGuard

    app = FastAPI(title="AutoGLM feedback API")
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, target="feedback")

    async def on_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AutoGLMError)
        return JSONResponse(exc.to_json(), status_code=exc.status, headers=exc.headers() or None)

    app.add_exception_handler(AutoGLMError, on_error)
    telemetry()  # the feedback score instrument on prometheus_client's registry
    FeedbackEndpoint(store, None, token).attach(app)
    app.add_api_route("/healthz", lambda: {"status": "ok"}, methods=["GET"])
    app.mount("/metrics", make_asgi_app())
    return app
