"""Generation as every protocol (KServe V1, Open Inference V2, OpenAI) sees it.

``LMService.start`` checks the limits, picks the revision and prompt variant, tokenizes and
queues the job, so every refusal (400/413/429) happens before a response starts. The returned
:class:`Generation` streams text deltas, applies stop sequences, and on close records the
request's metrics, energy and span, and releases its lease on the revision.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from autoglm_inference.engine import Finished, Job, Token
from autoglm_inference.generation import Sampling
from autoglm_inference.limits import Limits, PromptTooLongError, TooManyNewTokensError
from autoglm_inference.prompts import NONE, PromptVariants, with_system_prompt
from autoglm_inference.revisions import Revision, Router
from autoglm_inference.telemetry import Labels, telemetry

REQUEST_ID_HEADER = "x-request-id"
REVISION_HEADER = "x-autoglm-revision"
VARIANT_HEADER = "x-autoglm-prompt-variant"


class BadRequestError(ValueError):
    status = 400


@dataclass
class GenerateRequest:
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    prompt_variant: str | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise BadRequestError("give exactly one of 'prompt' (text) or 'messages' (chat)")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise BadRequestError("'prompt' must be a string")
        if self.messages is not None and not (
            isinstance(self.messages, list)
            and self.messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in self.messages
            )
        ):
            raise BadRequestError("'messages' must be a non-empty list of {role, content} strings")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise BadRequestError(f"'max_tokens' must be a positive integer, got {self.max_tokens!r}")
        if not 0 <= float(self.temperature) <= 2:
            raise BadRequestError(f"'temperature' must be between 0 and 2, got {self.temperature!r}")
        if not 0 < float(self.top_p) <= 1:
            raise BadRequestError(f"'top_p' must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if (
            not isinstance(self.stop, list)
            or not all(isinstance(s, str) and s for s in self.stop)
            or len(self.stop) > 4
        ):
            raise BadRequestError("'stop' must be a string or a list of at most 4 non-empty strings")

    @classmethod
    def from_json(cls, body: Any, *, defaults: dict[str, Any] | None = None) -> GenerateRequest:
        if not isinstance(body, dict):
            raise BadRequestError("the request must be a JSON object")
        known = {"prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "prompt_variant"}
        values = {**(defaults or {}), **{k: v for k, v in body.items() if k in known and v is not None}}
        try:
            return cls(**values)
        except TypeError as exc:
            raise BadRequestError(str(exc)) from exc


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
        self, name: str, router: Router, *, prompts: PromptVariants, limits: Limits, target: str = "local"
    ) -> None:
        self.name = name
        self.router = router
        self.prompts = prompts
        self.limits = limits
        self.target = target

    def start(self, request: GenerateRequest, headers: dict[str, str] | None = None) -> Generation:
        headers = headers or {}
        request_id = headers.get(REQUEST_ID_HEADER) or str(uuid.uuid4())
        if request.max_tokens > self.limits.max_new_tokens:
            raise TooManyNewTokensError(request.max_tokens, self.limits.max_new_tokens)
        revision = self.router.choose(request.revision or headers.get(REVISION_HEADER))
        lease = revision.lease()
        lease.__enter__()
        try:
            variant, ids = self._render(revision, request, headers.get(VARIANT_HEADER))
            if len(ids) > self.limits.max_prompt_tokens:
                raise PromptTooLongError(len(ids), self.limits.max_prompt_tokens)
            tokenizer = revision.loaded.tokenizer
            stop_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
            job = Job(
                prompt_ids=ids,
                max_new_tokens=request.max_tokens,
                stop_ids=frozenset(stop_ids),
                sampling=Sampling(request.temperature, request.top_p, request.seed),
                request_id=request_id,
            )
            labels = Labels(self.name, revision.name, variant, self.target)
            revision.engine.submit(job)
        except BaseException:
            lease.__exit__(None, None, None)
            raise
        return Generation(self, request, revision, lease, job, labels)

    def _render(
        self, revision: Revision, request: GenerateRequest, pinned: str | None
    ) -> tuple[str, list[int]]:
        tokenizer = revision.loaded.tokenizer
        if request.messages is None:
            assert request.prompt is not None
            if not request.prompt:
                raise BadRequestError("'prompt' is empty")
            return NONE, list(tokenizer(request.prompt, add_special_tokens=False)["input_ids"])
        variant, text = self.prompts.resolve(request.prompt_variant or pinned)
        messages, applied = with_system_prompt(request.messages, text)
        ids: Any
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if not isinstance(ids, list):  # a BatchEncoding in newer transformers
                ids = ids["input_ids"]
        else:  # a tokenizer without a chat template: a plain transcript
            transcript = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            ids = tokenizer(transcript, add_special_tokens=False)["input_ids"]
        return (variant if applied else NONE), [int(i) for i in ids]


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
    ) -> None:
        self.service = service
        self.request = request
        self.revision = revision
        self.job = job
        self.labels = labels
        self.text = ""
        self.finish_reason: str | None = None
        self._lease = lease
        self._closed = False
        self._started = time.perf_counter()
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
        """Text as it is generated; stop sequences are cut and never shown."""
        stops = self.request.stop
        hold = max((len(s) for s in stops), default=1) - 1
        tokenizer = self.revision.loaded.tokenizer
        shown = 0
        try:
            async for event in self.job.events():
                if isinstance(event, Token):
                    full = str(tokenizer.decode(self.job.generated, skip_special_tokens=True))
                    if full.endswith("\ufffd"):
                        continue  # half of a multi-byte character: wait for the rest
                    self.text = full
                    cut = _first_stop(full, stops)
                    if cut is not None:
                        self.text = full[:cut]
                        self.finish_reason = "stop"
                        self.job.cancel()
                        if cut > shown:
                            yield self.text[shown:]
                        return
                    if len(full) - hold > shown:
                        yield full[shown : len(full) - hold]
                        shown = len(full) - hold
                elif isinstance(event, Finished):
                    if event.reason == "error":
                        raise RuntimeError(f"generation failed: {event.error}")
                    self.finish_reason = self.finish_reason or event.reason
                    self.text = str(tokenizer.decode(self.job.generated, skip_special_tokens=True))
                    if len(self.text) > shown:
                        yield self.text[shown:]
                    return
        finally:
            self.close()

    async def result(self) -> GenerateResult:
        async for _ in self.deltas():
            pass
        return self.summary()

    def summary(self) -> GenerateResult:
        return GenerateResult(
            text=self.text,
            finish_reason=self.finish_reason or "cancelled",
            prompt_tokens=len(self.job.prompt_ids),
            completion_tokens=len(self.job.generated),
            revision=self.revision.name,
            prompt_variant=self.labels.prompt_variant,
            request_id=self.request_id,
            joules=self.job.joules,
            energy_method=self.job.energy_method,
        )

    def close(self, error_status: int | None = None) -> None:
        """Record metrics and release the lease; safe to call more than once."""
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
        t.request_duration.record(now - self._started, attrs)
        t.tokens.add(len(job.prompt_ids), self.labels.attrs(direction="in"))
        t.tokens.add(len(job.generated), self.labels.attrs(direction="out"))
        if job.first_token_at is not None:
            t.time_to_first_token.record(job.first_token_at - job.submitted_at, attrs)
            if len(job.generated) > 1:
                t.inter_token_latency.record((now - job.first_token_at) / (len(job.generated) - 1), attrs)
        energy_attrs = self.labels.attrs(method=job.energy_method)
        t.energy.add(job.joules, energy_attrs)
        t.energy_per_request.record(job.joules, energy_attrs)
        if job.generated:
            t.energy_per_token.record(job.joules / len(job.generated), energy_attrs)
        if error_status is not None:
            t.errors.add(1, self.labels.attrs(code=str(error_status)))
        self._span.set_attribute("completion_tokens", len(job.generated))
        self._span.set_attribute("finish_reason", self.finish_reason or "cancelled")
        self._span.set_attribute("energy_joules", job.joules)
        self._span.end()


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else None
