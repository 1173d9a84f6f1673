"""The ASGI middleware in front of every route: request id, body limit, disconnects, error counts.

- ``x-request-id``: the client's, or a new UUID; set on every response.
- The body is read here, at most ``max_body_bytes`` (declared or chunked); more gets 413 with the
  limit named, before any route runs. Memory per request is bounded by the limit.
- Once the body is read, a watcher waits for the client to go away. Routes that answer in one
  piece (non-streaming OpenAI, KServe V1/V2) race their work against ``client_gone()``, so a client
  that gave up stops costing decode steps; streaming responses see the disconnect through Starlette.
- Every response of 400 or more on an inference route counts in ``autoglm_errors_total`` with the
  same labels as the other instruments (``-`` where routing had not learned them yet); streams
  that fail after their status line count themselves (``count_stream_error``).
- An unhandled error becomes a JSON 500 here, so it too carries the request id.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

from autoglm_inference.limits import BodyTooLargeError
from autoglm_inference.telemetry import begin_request, telemetry

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
T = TypeVar("T")
log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
#: Inference routes: their error responses count in ``autoglm_errors_total`` (management routes,
#: stray paths and clients that went away, 499, do not).
INFERENCE_PREFIXES = ("/openai/", "/v1/models/", "/v2/models/")
CLIENT_GONE_STATUS = 499

_gone: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar(
    "autoglm_client_gone", default=None
)


class ClientGoneError(Exception):
    """The client disconnected before the answer was ready."""


async def until_done_or_gone(work: Awaitable[T]) -> T:
    """Await ``work``, or cancel it when the current request's client disconnects first."""
    gone = _gone.get()
    task = asyncio.ensure_future(work)
    if gone is None:
        return await task
    waiter = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGoneError


class RequestGuard:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, target: str) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.target = target

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = headers.get(REQUEST_ID_HEADER) or str(uuid.uuid4())
        if REQUEST_ID_HEADER not in headers:  # routes see the id the response will carry
            scope["headers"] = [*scope.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
        labels = begin_request(self.target)
        counted = scope.get("method") == "POST" and scope.get("path", "").startswith(INFERENCE_PREFIXES)
        status: list[int] = []

        def send_with_id(message: Message) -> Awaitable[None]:
            # Not a coroutine of its own: a streamed answer passes each event through here.
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
                raw = list(message.get("headers", []))
                if not any(k.lower() == REQUEST_ID_HEADER.encode() for k, _ in raw):
                    raw.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message["headers"] = raw
            return send(message)

        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(send_with_id, BodyTooLargeError(int(declared), self.max_body_bytes))
            self._count(status, labels, counted)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self._refuse(send_with_id, BodyTooLargeError(None, self.max_body_bytes))
                self._count(status, labels, counted)
                return
            if not message.get("more_body", False):
                break

        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        token = _gone.set(gone)
        try:
            await self.app(scope, replay, send_with_id)
        except Exception:
            log.exception(
                "unhandled error answering %s %s (request %s)",
                scope.get("method"),
                scope.get("path"),
                request_id,
            )
            if status:
                raise  # the response has started: nothing better to send
            error = {"error": "internal error; see the server log", "request_id": request_id}
            await self._send_json(send_with_id, 500, error)
        finally:
            _gone.reset(token)
            watcher.cancel()
            self._count(status, labels, counted)

    @classmethod
    async def _refuse(cls, send: Send, error: BodyTooLargeError) -> None:
        await cls._send_json(send, error.status, error.to_json())

    @staticmethod
    async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    @staticmethod
    def _count(status: list[int], labels: dict[str, str], counted: bool) -> None:
        if counted and status and status[0] >= 400 and status[0] != CLIENT_GONE_STATUS:
            telemetry().errors.add(1, {**labels, "code": str(status[0])})


def count_stream_error(labels: dict[str, str], status: int) -> None:
    """A streamed response that failed after its 200 went out: count it as the status it would have had."""
    telemetry().errors.add(1, {**labels, "code": str(status)})
