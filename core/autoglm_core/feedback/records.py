"""What a feedback event and a served request are, checked and normalised (pure code).

A feedback event rates one answer, named by the ``x-request-id`` its response carried. Its score is
one of three kinds, normalised to [0, 1] and stored with its kind and the value as given:

- ``thumbs``: ``"up"`` or ``"down"`` (or ``true``/``false``): 1 or 0;
- ``rating``: an integer from 1 to 5: (rating - 1) / 4;
- ``number``: a number in [0, 1], as is (the default kind for a number).

A request record is what the server knew when it answered: revision, prompt variant, target,
latency, tokens, energy, and the prompt and answer (truncated), which retraining and drift need.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from autoglm_core.errors import AutoGLMError

ScoreKind = Literal["thumbs", "rating", "number"]
#: Events one batch may carry.
MAX_BATCH: Final = 1000
#: Characters of a prompt or an answer a request record keeps.
MAX_TEXT_CHARS: Final = 8192
REQUEST_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"

FIELD_RULES: Final[dict[str, str]] = {
    "request_id": "'request_id' must be the x-request-id of a response: 1-128 letters, digits, '.', '_', ':' "
    "or '-'",
    "source": "'source' must be 1-64 letters, digits, '.', '_', ':' or '-' (who rated: user, an app, a reviewer)",
    "score": '\'score\' must be "up"/"down" or true/false (thumbs), an integer 1-5 (rating), or a number in '
    "[0, 1] (number)",
    "kind": "'kind' must be one of thumbs, rating, number",
    "correction": f"'correction' must be a string of at most {MAX_TEXT_CHARS} characters",
    "labels": "'labels' must map at most 16 names (1-63 characters) to strings of at most 256",
}


class FeedbackError(AutoGLMError, ValueError):
    """Feedback that is not what the API takes: the message names each bad field (400)."""

    default_status = 400


LabelName = Annotated[str, Field(min_length=1, max_length=63)]
LabelValue = Annotated[StrictStr, Field(max_length=256)]


class FeedbackIn(BaseModel):
    """One feedback event as a client sends it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    request_id: StrictStr = Field(pattern=REQUEST_ID_PATTERN)
    source: StrictStr = Field(default="user", pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
    score: StrictStr | StrictBool | StrictInt | StrictFloat
    kind: ScoreKind | None = None
    correction: StrictStr | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    labels: dict[LabelName, LabelValue] = Field(default_factory=dict, max_length=16)

    @model_validator(mode="after")
    def _score_fits_kind(self) -> FeedbackIn:
        normalise(self.score, self.kind)  # raises ValueError naming what is allowed
        return self

    def normalised(self) -> tuple[ScoreKind, float]:
        return normalise(self.score, self.kind)


def normalise(score: Any, kind: ScoreKind | None) -> tuple[ScoreKind, float]:
    """(kind, score in [0, 1]) of a score as given; ValueError saying what the kind allows."""
    if kind is None:
        kind = "thumbs" if isinstance(score, str | bool) else "number"
    if kind == "thumbs":
        if score in ("up", True):
            return kind, 1.0
        if score in ("down", False):
            return kind, 0.0
        raise ValueError(f'a thumbs score is "up", "down", true or false, got {_shown(score)}')
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise ValueError(f"a {kind} score is a number, got {_shown(score)}")
    if kind == "rating":
        if isinstance(score, int) and 1 <= score <= 5:
            return kind, (score - 1) / 4
        raise ValueError(f"a rating is an integer from 1 to 5, got {_shown(score)}")
    if 0.0 <= float(score) <= 1.0:
        return kind, float(score)
    hint = '; for a 1-5 rating say "kind": "rating"' if isinstance(score, int) and 1 < score <= 5 else ""
    raise ValueError(f"a number score is in [0, 1], got {_shown(score)}{hint}")


def parse_feedback(body: Any) -> list[FeedbackIn]:
    """One event (an object) or a batch (``{"feedback": [...]}``, at most ``MAX_BATCH``); raises
    FeedbackError naming every bad field on one line (``feedback[3].score: ...`` in a batch)."""
    if isinstance(body, dict) and "feedback" in body:
        if set(body) != {"feedback"}:
            raise FeedbackError('a batch is {"feedback": [event, ...]} with no other field')
        items = body["feedback"]
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
            raise FeedbackError(f"'feedback' must be a list of 1 to {MAX_BATCH} events")
        prefix = "feedback[{}]: "
    else:
        items, prefix = [body], ""
    events: list[FeedbackIn] = []
    problems: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append(
                f"feedback[{i}] must be a JSON object" if prefix else "the body must be a JSON object"
            )
            continue
        try:
            events.append(FeedbackIn.model_validate(item))
        except ValidationError as exc:
            problems.extend(prefix.format(i) + p for p in _field_errors(exc))
    if problems:
        shown = problems[:10] + ([f"and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise FeedbackError("; ".join(shown))
    return events


def _field_errors(exc: ValidationError) -> list[str]:
    problems: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        name = str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == "missing":
            problems.setdefault(name, f"'{name}' is required")
        elif err["type"] == "extra_forbidden":
            allowed = ", ".join(FeedbackIn.model_fields)
            problems.setdefault(name, f"'{name}' is not a feedback field (allowed: {allowed})")
        elif not name:  # the model validator: the score does not fit its kind
            problems.setdefault("score", f"'score': {str(err['msg']).removeprefix('Value error, ')}")
        elif name in FIELD_RULES:
            problems.setdefault(name, f"{FIELD_RULES[name]}, got {_shown(err['input'])}")
        else:
            problems.setdefault(name, str(err["msg"]))
    return list(problems.values())


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class RequestRecord:
    """One answered request, as the server that answered it recorded it."""

    request_id: str
    time: float  # unix seconds when it was received
    model: str
    revision: str
    prompt_variant: str
    target: str
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    joules: float
    energy_method: str
    status: str  # ok | error | cancelled
    ttft_s: float | None = None
    prompt: str = ""
    output: str = ""

    def __post_init__(self) -> None:
        if not re.match(REQUEST_ID_PATTERN, self.request_id):
            raise ValueError(f"request id {self.request_id!r} does not match {REQUEST_ID_PATTERN}")


@dataclass(frozen=True)
class Accepted:
    """What the store did with one feedback event."""

    request_id: str
    source: str
    status: Literal["accepted", "duplicate", "unknown_request"]
    score: float | None = None
    kind: str | None = None
    revision: str | None = None
    prompt_variant: str | None = None
    model: str | None = None
    target: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"request_id": self.request_id, "source": self.source, "status": self.status}
        if self.status == "accepted":
            out.update(
                score=self.score, kind=self.kind, revision=self.revision, prompt_variant=self.prompt_variant
            )
        return out
