"""The ASGI guard in front of every route, driven directly with ASGI messages."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from autoglm_inference.middleware import ClientGoneError, RequestGuard, until_done_or_gone


def scope(
    path: str = "/openai/v1/completions", headers: list[tuple[bytes, bytes]] | None = None
) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "headers": headers or []}


async def call(guard: RequestGuard, s: dict[str, Any], chunks: list[bytes]) -> list[dict[str, Any]]:
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await guard(s, receive, send)
    return sent


def header(start: dict[str, Any], name: bytes) -> bytes | None:
    return next((v for k, v in start["headers"] if k.lower() == name), None)


@pytest.mark.asyncio
async def test_an_unhandled_error_is_a_json_500_that_still_carries_the_request_id() -> None:
    async def broken(_scope: Any, _receive: Any, _send: Any) -> None:
        raise RuntimeError("boom")

    sent = await call(
        RequestGuard(broken, max_body_bytes=100, target="t"),
        scope(headers=[(b"x-request-id", b"r-1")]),
        [b"{}"],
    )
    assert sent[0]["status"] == 500
    assert header(sent[0], b"x-request-id") == b"r-1"
    assert json.loads(sent[1]["body"])["request_id"] == "r-1"


@pytest.mark.asyncio
async def test_the_route_gets_the_whole_body_and_a_request_id() -> None:
    seen: dict[str, Any] = {}

    async def echo(s: Any, receive: Any, send: Any) -> None:
        seen["body"] = (await receive())["body"]
        seen["headers"] = dict(s["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = await call(RequestGuard(echo, max_body_bytes=100, target="t"), scope(), [b'{"a":', b" 1}"])
    assert seen["body"] == b'{"a": 1}'
    assert header(sent[0], b"x-request-id") == seen["headers"][b"x-request-id"]


@pytest.mark.asyncio
async def test_a_chunked_body_over_the_limit_never_reaches_the_route() -> None:
    async def route(*_: Any) -> None:
        raise AssertionError("the route must not run")

    sent = await call(RequestGuard(route, max_body_bytes=10, target="t"), scope(), [b"x" * 6, b"y" * 6])
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["limit"] == "max_body_bytes"


@pytest.mark.asyncio
async def test_work_is_cancelled_when_the_client_goes_away() -> None:
    cancelled = asyncio.Event()

    async def slow_route(_scope: Any, _receive: Any, send: Any) -> None:
        async def work() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        with pytest.raises(ClientGoneError):
            await until_done_or_gone(work())
        await send({"type": "http.response.start", "status": 499, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    messages = [{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        if len(messages) == 1:
            await asyncio.sleep(0.05)  # the client leaves after a moment
        return messages.pop(0)

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await RequestGuard(slow_route, max_body_bytes=100, target="t")(scope(), receive, send)
    assert cancelled.is_set()
    assert sent[0]["status"] == 499
