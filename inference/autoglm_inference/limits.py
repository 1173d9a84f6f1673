"""Request limits and the errors that name them (400, 413, 429), so a client knows what to change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autoglm_core.errors import AutoGLMError


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    max_body_bytes: int = 1 << 20
    max_queue: int = 64

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")


class LimitError(AutoGLMError):
    """A request beyond a limit; ``status`` is the HTTP code, ``limit`` the limit's name."""

    default_status = 400

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "limit": self.limit}


class PromptTooLongError(LimitError):
    def __init__(self, tokens: int | None, limit: int) -> None:
        has = f"has {tokens} tokens" if tokens is not None else "is far longer than the limit"
        super().__init__(
            "max_prompt_tokens", f"the prompt {has}; at most {limit} tokens (max_prompt_tokens) are allowed"
        )


class ContextTooLongError(LimitError):
    def __init__(self, prompt: int, new: int, context: int) -> None:
        super().__init__(
            "context_length",
            f"{prompt} prompt tokens + max_tokens {new} exceed the model's context of {context} positions",
        )


class TooManyNewTokensError(LimitError):
    def __init__(self, asked: int, limit: int) -> None:
        super().__init__(
            "max_new_tokens", f"max_tokens is {asked}; at most {limit} (max_new_tokens) are allowed"
        )


class BodyTooLargeError(LimitError):
    default_status = 413

    def __init__(self, size: int | None, limit: int) -> None:
        got = f"{size} bytes" if size is not None else "more than that"
        super().__init__(
            "max_body_bytes", f"the request body is {got}; at most {limit} bytes (max_body_bytes) are allowed"
        )


class QueueFullError(LimitError):
    default_status = 429

    def __init__(self, limit: int, *, retry_after: float, reason: str | None = None) -> None:
        super().__init__(
            "max_queue",
            reason or f"{limit} requests are already waiting (max_queue); retry after {retry_after:.0f}s",
        )
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}
