"""Generation as every protocol (KServe V1, Open Inference V2, OpenAI) sees it.

``LMService.start`` checks the limits, picks the revision and prompt variant, tokenizes and
queues the job, so every refusal (400/413/429) happens before a response starts. The returned
:class:`Generation` streams text deltas, applies stop sequences, and on close records the
request's metrics, energy and span, and releases its lease on the revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Self

from jinja2 import TemplateError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from autoglm_core.errors import AutoGLMError
from autoglm_core.feedback.records import RequestRecord
from autoglm_inference.detokenize import Detokenizer
from autoglm_inference.engine import Finished, Job, Token
from autoglm_inference.faults import NONE as NO_FAULT
from autoglm_inference.faults import Fault, Faults
from autoglm_inference.limits import (
    ContextTooLongError,
    Limits,
    PromptTooLongError,
    QueueFullError,
    TooManyNewTokensError,
)
from autoglm_inference.middleware import REQUEST_ID_HEADER
from autoglm_inference.prompts import NONE, PromptVariants, with_system_prompt
from autoglm_inference.revisions import Revision, Router
from autoglm_inference.sampling import Sampling
from autoglm_inference.telemetry import Labels, request_labels, telemetry

#: Prompts shorter than this are tokenized on the event loop (a thread hop costs more than they do).
INLINE_TOKENIZE_CHARS = 4096
DEFAULT_TEXT_TOKENS = 16  # OpenAI's default for completions
DEFAULT_CHAT_TOKENS = 64
REVISION_HEADER = "x-autoglm-revision"
VARIANT_HEADER = "x-autoglm-prompt-variant"


class BadRequestError(AutoGLMError, ValueError):
    """A request that is not what the route takes: the message names the field and what is allowed."""

    default_status = 400


class GenerationError(AutoGLMError, RuntimeError):
    """The model failed while generating (500)."""

    default_status = 500


class UnavailableError(AutoGLMError, RuntimeError):
    """The revision was unloaded before the request ran (503, retry)."""

    default_status = 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI's optional "name" and the like

    role: StrictStr
    content: StrictStr


#: What each field must be, said once: a bad value gets "<this>, got <value>".
FIELD_RULES: dict[str, str] = {
    "prompt": "'prompt' must be a string",
    "messages": "'messages' must be a non-empty list of {role, content} strings",
    "max_tokens": "'max_tokens' must be a positive integer",
    "temperature": "'temperature' must be a number from 0 to 2",
    "top_p": "'top_p' must be a number in (0, 1]",
    "seed": "'seed' must be an integer from 0 to 2**63-1",
    "stop": "'stop' must be a string or a list of at most 4 non-empty strings",
    "prompt_variant": "'prompt_variant' must be a string",
}
#: The fields a request body may set (``revision`` is chosen by the server, never by the body).
BODY_FIELDS = frozenset(FIELD_RULES)


class GenerateRequest(BaseModel):
    """One generation as every protocol asks for it; ``from_json`` reads a request body.

    Strict types: ``"0.5"`` is not a temperature and ``true`` is not a token count.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    #: None: the server's default (16 for text, 64 for chat, within the limit).
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat = Field(default=0.0, ge=0, le=2)
    top_p: StrictFloat = Field(default=1.0, gt=0, le=1)
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**63)
    stop: list[Annotated[StrictStr, Field(min_length=1)]] = Field(default_factory=list, max_length=4)
    prompt_variant: StrictStr | None = None
    revision: StrictStr | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError(
                "prompt_or_messages", "give exactly one of 'prompt' (text) or 'messages' (chat)"
            )
        return self

    @classmethod
    def from_json(cls, body: Any, *, defaults: dict[str, Any] | None = None) -> GenerateRequest:
        """Validate a request body; a null field means its default. Raises BadRequestError naming
        every bad field on one line."""
        if not isinstance(body, dict):
            raise BadRequestError("the request must be a JSON object")
        values = {**(defaults or {}), **{k: v for k, v in body.items() if k in BODY_FIELDS and v is not None}}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise BadRequestError(_field_errors(exc)) from exc

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages or []]


def _field_errors(exc: ValidationError) -> str:
    problems: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        field = str(err["loc"][0]) if err["loc"] else ""
        if field in FIELD_RULES:
            problems.setdefault(field, f"{FIELD_RULES[field]}, got {_shown(err['input'])}")
        else:
            problems.setdefault(field, err["msg"])
    return "; ".join(problems.values())


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float | bool | list | dict) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class GenerateResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    revision: str
    prompt_variant: str
    request_id: str
    joules: float
    energy_method: str

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "revision": self.revision,
            "prompt_variant": self.prompt_variant,
            "request_id": self.request_id,
            "energy_joules": self.joules,
            "energy_method": self.energy_method,
        }


class LMService:
    """One served model name: its revisions, prompt variants and limits."""

    def __init__(
        self,
        name: str,
        router: Router,
        *,
        prompts: PromptVariants,
        limits: Limits,
        target: str = "local",
        faults: Faults | None = None,
        on_request: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        self.name = name
        self.router = router
        self.prompts = prompts
        self.limits = limits
        self.target = target
        self.faults = faults  # tests only
        #: Called with the record of every request that ran (the request log feedback is joined to).
        self.on_request = on_request

    async def start_async(
        self,
        request: GenerateRequest,
        headers: dict[str, str] | None = None,
        *,
        received: float | None = None,
    ) -> Generation:
        """``start`` for the server's routes: a long prompt is tokenized in a worker thread, so the
        event loop (and every stream it serves) never waits for it. The revision is chosen and leased
        before that wait, so a swap meanwhile lets this request finish where it started."""
        received = time.perf_counter() if received is None else received
        headers = headers or {}
        if _prompt_chars(request) < INLINE_TOKENIZE_CHARS:
            return self.start(request, headers, received=received)
        revision, lease, max_tokens = self._admit(request, headers)
        try:
            variant, ids = await asyncio.to_thread(
                self._render, revision, request, headers.get(VARIANT_HEADER)
            )
            return self._submit(request, headers, revision, lease, max_tokens, variant, ids, received)
        except BaseException:
            lease.__exit__(None, None, None)
            raise

    def start(
        self,
        request: GenerateRequest,
        headers: dict[str, str] | None = None,
        *,
        received: float | None = None,
    ) -> Generation:
        """Check limits, pick revision and variant, tokenize and queue; raises before anything runs.
        ``received``: when the request arrived (``time.perf_counter()``), where latency starts."""
        received = time.perf_counter() if received is None else received
        headers = headers or {}
        revision, lease, max_tokens = self._admit(request, headers)
        try:
            variant, ids = self._render(revision, request, headers.get(VARIANT_HEADER))
            return self._submit(request, headers, revision, lease, max_tokens, variant, ids, received)
        except BaseException:
            lease.__exit__(None, None, None)
            raise

    def _admit(
        self, request: GenerateRequest, headers: dict[str, str]
    ) -> tuple[Revision, contextlib.AbstractContextManager[Revision], int]:
        """Check the token limit and the queue, choose the revision and take a lease on it, with no
        await in between: a swap cannot retire the revision before the lease is held."""
        request_labels(model=self.name)  # a refusal below is counted under this model's name
        chat = request.messages is not None
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = min(DEFAULT_CHAT_TOKENS if chat else DEFAULT_TEXT_TOKENS, self.limits.max_new_tokens)
        if max_tokens > self.limits.max_new_tokens:
            raise TooManyNewTokensError(max_tokens, self.limits.max_new_tokens)
        revision = self.router.choose(request.revision or headers.get(REVISION_HEADER))
        request_labels(revision=revision.name)
        if self.faults is not None and self.faults.fails(revision.name):
            raise GenerationError(f"an injected test fault failed this request to {revision.name}")
        engine = revision.engine
        if engine.queue_depth >= engine.max_queue:  # refuse before spending time on tokenizing
            raise QueueFullError(engine.max_queue, retry_after=engine.retry_after())
        lease = revision.lease()
        lease.__enter__()
        return revision, lease, max_tokens

    def _submit(
        self,
        request: GenerateRequest,
        headers: dict[str, str],
        revision: Revision,
        lease: contextlib.AbstractContextManager[Revision],
        max_tokens: int,
        variant: str,
        ids: list[int],
        received: float,
    ) -> Generation:
        request_labels(prompt_variant=variant)
        if len(ids) > self.limits.max_prompt_tokens:
            raise PromptTooLongError(len(ids), self.limits.max_prompt_tokens)
        config = getattr(revision.loaded.model, "config", None)  # None: unloaded meanwhile (submit refuses)
        context = getattr(config, "max_position_embeddings", None)
        if isinstance(context, int) and len(ids) + max_tokens > context:
            raise ContextTooLongError(len(ids), max_tokens, context)
        job = Job(
            prompt_ids=ids,
            max_new_tokens=max_tokens,
            stop_ids=stop_token_ids(revision),
            sampling=Sampling(request.temperature, request.top_p, request.seed),
            request_id=headers.get(REQUEST_ID_HEADER) or str(uuid.uuid4()),
            submitted_at=received,
        )
        labels = Labels(self.name, revision.name, variant, self.target)
        revision.engine.submit(job)
        fault = self.faults.of(revision.name) if self.faults is not None else NO_FAULT
        return Generation(self, request, revision, lease, job, labels, fault)

    def _render(
        self, revision: Revision, request: GenerateRequest, pinned: str | None
    ) -> tuple[str, list[int]]:
        tokenizer = revision.loaded.tokenizer
        if _prompt_chars(request) > self.limits.max_prompt_tokens * longest_token_chars(tokenizer):
            raise PromptTooLongError(None, self.limits.max_prompt_tokens)  # surely over: no need to tokenize
        if request.messages is None:
            assert request.prompt is not None
            if not request.prompt:
                raise BadRequestError("'prompt' is empty")
            # The tokenizer's own special tokens (BOS, GLM's [gMASK]<sop>) as the model was trained with.
            return NONE, [int(i) for i in tokenizer(request.prompt)["input_ids"]]
        variant, text = self.prompts.resolve(request.prompt_variant or pinned)
        messages, applied = with_system_prompt(request.chat_messages(), text)
        ids: Any
        if getattr(tokenizer, "chat_template", None):
            try:
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            except TemplateError as exc:  # e.g. roles that do not alternate as the template requires
                raise BadRequestError(f"the model's chat template refused the messages: {exc}") from exc
            if not isinstance(ids, list):  # a BatchEncoding in newer transformers
                ids = ids["input_ids"]
        else:  # a tokenizer without a chat template: a plain transcript
            transcript = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            ids = tokenizer(transcript)["input_ids"]
        return (variant if applied else NONE), [int(i) for i in ids]


def _prompt_chars(request: GenerateRequest) -> int:
    return len(request.prompt or "") + sum(len(m.content) for m in request.messages or [])


def stop_token_ids(revision: Revision) -> frozenset[int]:
    """End-of-sequence ids: the tokenizer's and the generation config's (chat models end a turn with
    their own, e.g. GLM-4's <|user|> and <|observation|>, Llama 3's <|eot_id|>)."""
    ids: set[int] = set()
    tokenizer = revision.loaded.tokenizer
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    config = getattr(revision.loaded.model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(i for i in eos if isinstance(i, int))
    return frozenset(ids)


def longest_token_chars(tokenizer: Any) -> int:
    """Characters in the tokenizer's longest token: a prompt longer than limit x this is over the limit.
    Computed once per tokenizer and kept on it."""
    longest = getattr(tokenizer, "_autoglm_longest_token", None)
    if longest is None:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=64)
        tokenizer._autoglm_longest_token = longest
    return int(longest)


class Generation:
    """One running request; iterate ``deltas()`` (or ``await result()``), then it closes itself."""

    def __init__(
        self,
        service: LMService,
        request: GenerateRequest,
        revision: Revision,
        lease: contextlib.AbstractContextManager[Revision],
        job: Job,
        labels: Labels,
        fault: Fault = NO_FAULT,
    ) -> None:
        self.service = service
        self.fault = fault
        self.request = request
        self.revision = revision
        self.job = job
        self.labels = labels
        self.text = ""
        self.finish_reason: str | None = None
        self._lease = lease
        self._tokens_at_stop: int | None = None
        self._closed = False
        self._failed = False
        self._received_unix = time.time() - (time.perf_counter() - job.submitted_at)
        self._span = telemetry().tracer.start_span(
            "autoglm.generate",
            attributes={**labels.attrs(), "request_id": job.request_id, "prompt_tokens": len(job.prompt_ids)},
        )

    @property
    def request_id(self) -> str:
        return self.job.request_id

    def headers(self) -> dict[str, str]:
        return {
            REQUEST_ID_HEADER: self.request_id,
            REVISION_HEADER: self.revision.name,
            VARIANT_HEADER: self.labels.prompt_variant,
        }

    async def deltas(self) -> AsyncIterator[str]:
        """Text as it is generated, one piece per batch of tokens the engine handed over (one token
        each, unless the reader fell behind or the engine gathers them by its stream interval); stop
        sequences are cut and never shown."""
        stops = self.request.stop
        hold = max((len(s) for s in stops), default=1) - 1
        detokenizer = Detokenizer(self.revision.loaded.tokenizer)
        ids: list[int] = []
        shown = 0
        try:
            while True:
                batch = await self.job.next_batch()
                for event in batch:
                    if isinstance(event, Token):
                        ids.append(event.id)
                        full = detokenizer.add(ids)
                        if len(full) == len(self.text):
                            continue  # half of a multi-byte character, or a special token: wait
                        self.text = full
                        if stops and self._cut_at_stop(full, len(ids)):
                            if len(self.text) > shown:
                                yield self.text[shown:]
                            return
                    elif isinstance(event, Finished):
                        await self._injected_delay()
                        if event.reason in ("error", "unavailable"):
                            self._failed = True
                        if event.reason == "error":
                            raise GenerationError(f"generation failed: {event.error}")
                        if event.reason == "unavailable":
                            raise UnavailableError(event.error or "the model revision is unavailable")
                        self.finish_reason = self.finish_reason or event.reason
                        self.text = detokenizer.finish(self.job.generated)
                        self._cut_at_stop(self.text, len(self.job.generated))
                        if len(self.text) > shown:
                            yield self.text[shown:]
                        return
                if len(self.text) - hold > shown:
                    yield self.text[shown : len(self.text) - hold]
                    shown = len(self.text) - hold
        finally:
            self.close()

    async def _injected_delay(self) -> None:
        """Tests only: hold the answer until it took ``latency_factor`` times its generation time."""
        if self.fault.latency_factor > 1:
            took = time.perf_counter() - self.job.submitted_at
            await asyncio.sleep(took * (self.fault.latency_factor - 1))

    def _cut_at_stop(self, text: str, tokens: int) -> bool:
        """Cut ``text`` (the first ``tokens`` tokens' text) at the first stop sequence, if any."""
        cut = _first_stop(text, self.request.stop)
        if cut is None:
            return False
        self.text = text[:cut]
        self.finish_reason = "stop"
        self._tokens_at_stop = tokens
        self.job.cancel()
        return True

    @property
    def completion_tokens(self) -> int:
        """Tokens the answer used (tokens decoded after a stop sequence was seen do not count)."""
        return self._tokens_at_stop if self._tokens_at_stop is not None else len(self.job.generated)

    async def result(self) -> GenerateResult:
        async for _ in self.deltas():
            pass
        return self.summary()

    def summary(self) -> GenerateResult:
        return GenerateResult(
            text=self.text,
            finish_reason=self.finish_reason or "cancelled",
            prompt_tokens=len(self.job.prompt_ids),
            completion_tokens=self.completion_tokens,
            revision=self.revision.name,
            prompt_variant=self.labels.prompt_variant,
            request_id=self.request_id,
            joules=self.job.joules,
            energy_method=self.job.energy_method,
        )

    def close(self) -> None:
        """Record metrics and release the lease; safe to call more than once. Errors are counted by
        the server's middleware, which sees every response's status."""
        if self._closed:
            return
        self._closed = True
        if self.finish_reason is None:
            self.job.cancel()  # the client went away: free the batch slot
        self._lease.__exit__(None, None, None)
        t = telemetry()
        job = self.job
        now = time.perf_counter()
        attrs = self.labels.attrs()
        tokens = self.completion_tokens
        t.request_duration.record(now - job.submitted_at, attrs)
        t.tokens.add(len(job.prompt_ids), self.labels.attrs(direction="in"))
        t.tokens.add(tokens, self.labels.attrs(direction="out"))
        if job.first_token_at is not None:
            t.time_to_first_token.record(job.first_token_at - job.submitted_at, attrs)
            last = job.finished_at or now
            if tokens > 1:
                t.inter_token_latency.record((last - job.first_token_at) / (tokens - 1), attrs)
        joules = job.joules * self.fault.joules_factor
        energy_attrs = self.labels.attrs(method=job.energy_method)
        t.energy.add(joules, energy_attrs)
        t.energy_per_request.record(joules, energy_attrs)
        if tokens:
            t.energy_per_token.record(joules / tokens, energy_attrs)
        self._span.set_attribute("completion_tokens", tokens)
        self._span.set_attribute("finish_reason", self.finish_reason or "cancelled")
        self._span.set_attribute("energy_joules", job.joules)
        self._span.end()
        if self.service.on_request is not None:
            try:
                record = self._record(now, tokens, joules)
            except ValueError:  # a client's own x-request-id that feedback could not name: not logged
                return
            self.service.on_request(record)

    def _record(self, now: float, tokens: int, joules: float) -> RequestRecord:
        job = self.job
        status = "error" if self._failed else ("ok" if self.finish_reason else "cancelled")
        return RequestRecord(
            request_id=job.request_id, time=self._received_unix, model=self.labels.model,
            revision=self.labels.revision, prompt_variant=self.labels.prompt_variant, target=self.labels.target,
            latency_s=now - job.submitted_at,
            ttft_s=None if job.first_token_at is None else job.first_token_at - job.submitted_at,
            prompt_tokens=len(job.prompt_ids), completion_tokens=tokens, joules=joules,
            energy_method=job.energy_method, status=status, prompt=_prompt_text(self.request), output=self.text,
        )  # fmt: skip


def _prompt_text(request: GenerateRequest) -> str:
    """The client's prompt as the request log keeps it: the text, or the chat as JSON (each message's
    content cut to a quarter of what the log keeps, so the JSON stays whole)."""
    if request.messages is None:
        return request.prompt or ""
    return json.dumps([{"role": m.role, "content": m.content[:2048]} for m in request.messages])


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else None
