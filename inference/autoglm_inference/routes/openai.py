"""OpenAI-compatible routes under ``/openai/v1``: completions and chat completions (``stream: true``
as server-sent events) and the model list. kserve's own OpenAI routes need vLLM and only see models
present at start-up, so these are ours."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from json.encoder import encode_basestring_ascii  # json.dumps(str), in C
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from autoglm_inference.middleware import count_stream_error, until_done_or_gone
from autoglm_inference.registry import Registry
from autoglm_inference.routes.deps import json_body, registry_of
from autoglm_inference.service import (
    BadRequestError,
    GenerateRequest,
    Generation,
    GenerationError,
    LMService,
    UnavailableError,
)

router = APIRouter(prefix="/openai/v1", tags=["openai"])
#: Stands for a streamed chunk's text while its event is rendered once (see ``openai_reply``).
_MARK = "\u0000autoglm-text\u0000"


def openai_service(registry: Registry, body: Any) -> LMService:
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise BadRequestError("'model' (the served model name) is required")
    if body.get("n") not in (None, 1):
        raise BadRequestError(f"'n' must be 1 (one choice per request), got {body.get('n')!r}")
    return registry.get(body["model"])


@router.get("/models")
async def openai_models(registry: Annotated[Registry, Depends(registry_of)]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "owned_by": "autoglm"} for n in sorted(registry.services)],
    }


@router.post("/completions")
async def completions(request: Request, registry: Annotated[Registry, Depends(registry_of)]) -> Any:
    received = time.perf_counter()  # latency starts here, before tokenizing
    body = await json_body(request)
    service = openai_service(registry, body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequestError("'prompt' must be one string")
    generation = await service.start_async(
        GenerateRequest.from_json({**body, "prompt": prompt}), dict(request.headers), received=received
    )
    return await openai_reply(generation, body, chat=False)


@router.post("/chat/completions")
async def chat_completions(request: Request, registry: Annotated[Registry, Depends(registry_of)]) -> Any:
    received = time.perf_counter()
    body = await json_body(request)
    service = openai_service(registry, body)
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
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True

    def event(data: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    def chunk(delta: str | None, finish: str | None) -> bytes:
        if chat:
            choice = {
                "index": 0,
                "delta": {"content": delta} if delta is not None else {},
                "finish_reason": finish,
            }
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return event({**base, "object": obj, "choices": [choice]})

    # A text chunk is the same event but for its text: render it once around a marker, then each
    # chunk is the two halves and its text as a JSON string (a dict and json.dumps per token cost
    # more, on the thread that shares the cores with decode).
    before, _, after = chunk(_MARK, None).partition(json.dumps(_MARK).encode())

    def text_chunk(delta: str) -> bytes:
        return before + encode_basestring_ascii(delta).encode() + after

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

    async def events() -> AsyncIterator[bytes]:
        try:
            if chat:
                first = {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
                yield event({**base, "object": obj, "choices": [first]})
            if first_delta is not None:
                yield text_chunk(first_delta)
                async for delta in deltas:
                    yield text_chunk(delta)
            yield chunk(None, generation.finish_reason or "stop")
            if include_usage:  # OpenAI's stream_options.include_usage: one last chunk, no choices
                prompt_tokens, completion_tokens = (
                    len(generation.job.prompt_ids),
                    len(generation.job.generated),
                )
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
                yield event({**base, "object": obj, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"
        except (GenerationError, UnavailableError) as exc:  # the status line is gone: say it in-band
            count_stream_error(generation.labels.attrs(), exc.status)
            yield event({"error": {"message": str(exc), "code": exc.status}})
        finally:
            generation.close()

    return StreamingResponse(events(), media_type="text/event-stream", headers=generation.headers())
