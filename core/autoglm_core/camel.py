"""The base of the JSON documents AutoGLM writes for itself (step results, quantization plans,
search trials, measurements): camelCase on disk, as the API's types, snake_case in Python."""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel


class CamelModel(BaseModel):
    """``to_json()`` writes camelCase keys; ``from_json()`` reads them and names a bad field."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_alias=True,
        validate_by_name=True,
        serialize_by_alias=True,
        extra="ignore",  # a file written by a newer release still reads; unknown keys are dropped
    )

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_json(cls, data: Any) -> Self:
        """Validate ``data``; raises pydantic's ValidationError (a ValueError) naming each bad field."""
        return cls.model_validate(data)


def field_errors(exc: ValidationError) -> str:
    """pydantic's errors on one line, each with its field path: ``groupSize: Input should be ...``."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)
