"""Generation requests, stop sequences, prompt variants and limits, without HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from transformers import AutoTokenizer

import autoglm_inference.service as service_module
from autoglm_inference.artifact import LoadedArtifact
from autoglm_inference.engine import Engine
from autoglm_inference.limits import ContextTooLongError, Limits, PromptTooLongError, TooManyNewTokensError
from autoglm_inference.prompts import PromptVariants, UnknownVariantError, Variants, with_system_prompt
from autoglm_inference.revisions import Router
from autoglm_inference.sampling import Sampling
from autoglm_inference.service import BadRequestError, GenerateRequest, LMService, UnavailableError
from autoglm_inference.telemetry import telemetry
from tests.support.tiny_models import tiny_glm

PROMPT = "Something is rotten in the state of Denmark"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_glm(tmp_path_factory.mktemp("svc") / "m", init_std=0.3, seed=3)


@pytest.fixture
def service(folder: Path, tmp_path: Path) -> Iterator[LMService]:
    def make(loaded: LoadedArtifact) -> Engine:
        return Engine(loaded.model, max_batch_delay_ms=0)

    router = Router.load_first("m", str(folder), sha256=None, make_engine=make, cache_dir=tmp_path)
    variants = PromptVariants(variants=Variants("short", {"short": "Be brief.", "long": "Be thorough."}))
    yield LMService("m", router, prompts=variants, limits=Limits(max_prompt_tokens=40, max_new_tokens=30))
    for revision in router.revisions():
        revision.engine.stop()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "exactly one of"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one of"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "temperature": "0.5"}, "temperature"),
        ({"prompt": "x", "temperature": "abc"}, "temperature"),
        ({"prompt": "x", "top_p": "0.9"}, "top_p"),
        ({"prompt": "x", "seed": 1.5}, "seed"),
        ({"prompt": "x", "seed": 2**70}, "seed"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "prompt_variant": ["a"]}, "prompt_variant"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"messages": []}, "messages"),
        ([1, 2], "JSON object"),
    ],
)
def test_malformed_requests_name_the_field(body: object, needle: str) -> None:
    with pytest.raises(BadRequestError, match=needle):
        GenerateRequest.from_json(body)


@pytest.mark.asyncio
async def test_streamed_deltas_join_to_the_whole_text(service: LMService) -> None:
    whole = await service.start(GenerateRequest(prompt=PROMPT, max_tokens=25)).result()
    generation = service.start(GenerateRequest(prompt=PROMPT, max_tokens=25))
    deltas = [d async for d in generation.deltas()]
    assert "".join(deltas) == whole.text
    assert len(deltas) > 1
    assert generation.summary().completion_tokens == whole.completion_tokens


@pytest.fixture
def gathered(folder: Path, tmp_path: Path) -> Iterator[LMService]:
    """A service whose engine hands tokens over at most once a minute: after the first, all at the end."""

    def make(loaded: LoadedArtifact) -> Engine:
        return Engine(loaded.model, max_batch_delay_ms=0, stream_interval_ms=60_000)

    router = Router.load_first("m", str(folder), sha256=None, make_engine=make, cache_dir=tmp_path)
    variants = PromptVariants(variants=Variants("short", {"short": "Be brief.", "long": "Be thorough."}))
    yield LMService("m", router, prompts=variants, limits=Limits(max_prompt_tokens=40, max_new_tokens=30))
    for revision in router.revisions():
        revision.engine.stop()


@pytest.mark.asyncio
async def test_gathered_tokens_stream_the_same_text_and_stop_at_the_same_token(
    service: LMService, gathered: LMService
) -> None:
    whole = await service.start(GenerateRequest(prompt=PROMPT, max_tokens=25)).result()
    generation = gathered.start(GenerateRequest(prompt=PROMPT, max_tokens=25))
    deltas = [d async for d in generation.deltas()]
    assert "".join(deltas) == whole.text
    assert 1 <= len(deltas) <= 2  # the first token's text, then the rest with the end
    stop = whole.text[len(whole.text) // 2 : len(whole.text) // 2 + 2]
    one = await service.start(GenerateRequest(prompt=PROMPT, max_tokens=25, stop=[stop])).result()
    held = await gathered.start(GenerateRequest(prompt=PROMPT, max_tokens=25, stop=[stop])).result()
    assert held.text == one.text == whole.text[: whole.text.index(stop)]
    assert held.finish_reason == one.finish_reason == "stop"
    # the tokens up to the one that completed the stop, not every token handed over with it
    assert held.completion_tokens == one.completion_tokens < whole.completion_tokens


class ScriptedRuntime:
    """Answers every prompt with ``script``, a token a step: a model whose answer the test chooses."""

    name = "scripted"

    def __init__(self, script: list[int]) -> None:
        self.script = script

    def prefill(self, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling]) -> ScriptedBatch:
        return ScriptedBatch(self.script, [0] * len(prompts))

    def idle(self) -> None:
        pass

    def release(self) -> None:
        pass


class ScriptedBatch:
    def __init__(self, script: list[int], at: list[int]) -> None:
        self.script, self.at = script, at

    @property
    def size(self) -> int:
        return len(self.at)

    def next_tokens(self) -> list[int]:
        return [self.script[at % len(self.script)] for at in self.at]

    def step(self) -> None:
        time.sleep(0.002)  # a model takes its time: the reader keeps up and gets a token at a time
        self.at = [at + 1 for at in self.at]

    def keep(self, rows: Sequence[int]) -> None:
        self.at = [self.at[row] for row in rows]

    def merge(self, other: ScriptedBatch) -> None:
        self.at += other.at


@pytest.mark.asyncio
async def test_an_answer_whose_spaces_the_tokenizer_cleans_up_streams_as_it_is_given_whole(
    folder: Path, tmp_path: Path
) -> None:
    """Before, the stream showed the text before transformers' clean-up (" ." for "."), and the
    answer's end, decoded whole and cleaned, was shorter than what had been shown, so its last
    characters were never sent where a stop sequence had held them back."""
    script = AutoTokenizer.from_pretrained(folder).encode(
        "Yes , I 'm sure it 's done . Bye !", add_special_tokens=False
    )
    router = Router.load_first(
        "m", str(folder), sha256=None, cache_dir=tmp_path,
        make_engine=lambda loaded: Engine(ScriptedRuntime(script), max_batch_delay_ms=0),
    )  # fmt: skip
    tokenizer = router.table.stable.loaded.tokenizer
    tokenizer.clean_up_tokenization_spaces = True
    tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True  # a BPE one
    whole = tokenizer.decode(script, skip_special_tokens=True)
    assert whole == "Yes, I'm sure it's done. Bye!"
    service = LMService("m", router, prompts=PromptVariants(), limits=Limits())
    try:
        for stop in ([], ["zz"]):  # a stop sequence holds the last character back until the end
            generation = service.start(GenerateRequest(prompt=PROMPT, max_tokens=len(script), stop=stop))
            streamed = [d async for d in generation.deltas()]
            assert "".join(streamed) == generation.text == whole
    finally:
        router.table.stable.engine.stop()


@pytest.mark.asyncio
async def test_a_stop_sequence_cuts_the_text_and_is_never_shown(service: LMService) -> None:
    whole = (await service.start(GenerateRequest(prompt=PROMPT, max_tokens=25)).result()).text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 2]
    assert stop.strip(), whole
    generation = service.start(GenerateRequest(prompt=PROMPT, max_tokens=25, stop=[stop]))
    streamed = "".join([d async for d in generation.deltas()])
    assert streamed == whole[: whole.index(stop)]
    assert generation.finish_reason == "stop"


@pytest.mark.asyncio
async def test_limits_are_checked_before_anything_is_queued(service: LMService) -> None:
    with pytest.raises(TooManyNewTokensError, match="max_new_tokens"):
        service.start(GenerateRequest(prompt="x", max_tokens=31))
    with pytest.raises(PromptTooLongError, match="max_prompt_tokens"):
        service.start(GenerateRequest(prompt="word " * 100, max_tokens=1))
    assert service.router.table.stable.leases == 0  # refused requests hold no lease
    assert service.router.table.stable.engine.in_flight == 0


@pytest.mark.asyncio
async def test_chat_gets_the_active_variant_unless_pinned_or_given_a_system_message(
    service: LMService,
) -> None:
    chat = [{"role": "user", "content": "Hello"}]
    assert service.start(GenerateRequest(messages=chat, max_tokens=1)).labels.prompt_variant == "short"
    pinned = service.start(GenerateRequest(messages=chat, max_tokens=1), {"x-autoglm-prompt-variant": "long"})
    assert pinned.labels.prompt_variant == "long"
    own = [{"role": "system", "content": "Mine."}, *chat]
    assert service.start(GenerateRequest(messages=own, max_tokens=1)).labels.prompt_variant == "none"
    assert service.start(GenerateRequest(prompt="Hi", max_tokens=1)).labels.prompt_variant == "none"
    with pytest.raises(UnknownVariantError, match="long"):
        service.start(GenerateRequest(messages=chat, max_tokens=1, prompt_variant="nope"))


def test_variants_file_reload_keeps_the_last_good_one(tmp_path: Path) -> None:
    path = tmp_path / "v.yaml"
    path.write_text("active: a\nvariants: {a: 'A.', b: 'B.'}\n")
    variants = PromptVariants(path)
    assert variants.resolve(None) == ("a", "A.")
    path.write_text("active: b\nvariants: {a: 'A.', b: 'B.'}\n")
    _touch_later(path)
    assert variants.resolve(None) == ("b", "B.")
    path.write_text("active: c\nvariants: {a: 'A.'}\n")  # names a variant it lacks
    _touch_later(path)
    assert variants.resolve(None) == ("b", "B.")


def test_a_bad_variants_file_fails_start_up(tmp_path: Path) -> None:
    path = tmp_path / "v.yaml"
    path.write_text("variants: [1, 2]\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        PromptVariants(path)


def test_system_prompt_is_added_only_when_missing() -> None:
    chat = [{"role": "user", "content": "Hi"}]
    assert with_system_prompt(chat, "S.") == ([{"role": "system", "content": "S."}, *chat], True)
    assert with_system_prompt(chat, None) == (chat, False)


def _touch_later(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


@pytest.mark.asyncio
async def test_each_request_is_a_span_with_its_labels_and_usage(service: LMService) -> None:
    exporter = InMemorySpanExporter()
    telemetry().tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    result = await service.start(
        GenerateRequest(prompt=PROMPT, max_tokens=5), {"x-request-id": "trace-1"}
    ).result()
    spans = [
        s
        for s in exporter.get_finished_spans()
        if s.attributes and s.attributes.get("request_id") == "trace-1"
    ]
    assert len(spans) == 1
    attributes = dict(spans[0].attributes or {})
    assert spans[0].name == "autoglm.generate"
    assert attributes["model"] == "m"
    assert attributes["revision"] == result.revision
    assert attributes["completion_tokens"] == result.completion_tokens
    assert attributes["energy_joules"] > 0
    exporter.shutdown()


@pytest.mark.asyncio
async def test_a_request_without_max_tokens_gets_a_default_within_the_limit(service: LMService) -> None:
    chat = service.start(GenerateRequest(messages=[{"role": "user", "content": "Hi"}]))
    assert chat.job.max_new_tokens == 30  # the chat default (64) capped by max_new_tokens
    text = service.start(GenerateRequest(prompt="Hi"))
    assert text.job.max_new_tokens == 16
    chat.close()
    text.close()


@pytest.mark.asyncio
async def test_prompt_plus_new_tokens_beyond_the_context_is_refused(folder: Path, tmp_path: Path) -> None:
    router = Router.load_first(
        "m", str(folder), sha256=None, make_engine=lambda a: Engine(a.model), cache_dir=tmp_path
    )
    wide = LMService("m", router, prompts=PromptVariants(), limits=Limits(max_new_tokens=2000))
    with pytest.raises(ContextTooLongError, match="context of 512"):
        wide.start(GenerateRequest(prompt=PROMPT, max_tokens=510))
    assert router.table.stable.leases == 0
    router.table.stable.engine.stop()


@pytest.mark.asyncio
async def test_a_request_queued_when_its_revision_is_unloaded_raises_unavailable(
    folder: Path, tmp_path: Path
) -> None:
    gate = threading.Event()
    busy = threading.Event()

    def one_row_at_a_time(loaded: LoadedArtifact) -> Engine:
        forward = loaded.model.forward

        def gated(*args: object, **kwargs: object) -> object:
            busy.set()
            if not gate.wait(60):
                raise TimeoutError("the test never opened the gate")
            return forward(*args, **kwargs)

        loaded.model.forward = gated  # type: ignore[method-assign]
        return Engine(loaded.model, max_batch_size=1, max_batch_delay_ms=0)

    router = Router.load_first(
        "m", str(folder), sha256=None, make_engine=one_row_at_a_time, cache_dir=tmp_path
    )
    service = LMService("m", router, prompts=PromptVariants(), limits=Limits())
    try:
        running = service.start(GenerateRequest(prompt=PROMPT, max_tokens=4))
        assert await asyncio.to_thread(busy.wait, 30)  # the engine holds the first row: the next one waits
        queued = service.start(GenerateRequest(prompt=PROMPT, max_tokens=4))
        await router.close()
    finally:
        gate.set()
    with pytest.raises(UnavailableError, match="unloaded"):
        await queued.result()
    assert (await running.result()).finish_reason == "length"  # a running row finishes
    assert router.table.stable.leases == 0


@contextlib.contextmanager
def tokenized_in_a_thread(tokenizer: object, spy: Callable[..., None] | None = None) -> Iterator[None]:
    """Every prompt takes the worker-thread path; ``spy(tokenizer)`` runs before each tokenization."""
    real = type(tokenizer).__call__  # type: ignore[operator]

    def call(self: object, *args: object, **kwargs: object) -> object:
        if spy is not None:
            spy(self)
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service_module, "INLINE_TOKENIZE_CHARS", 1)
        patch.setattr(type(tokenizer), "__call__", call)
        yield


async def eventually(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_a_swap_while_the_prompt_is_tokenized_lets_the_request_finish(
    service: LMService, folder: Path
) -> None:
    old = service.router.table.stable
    tokenizing = threading.Event()
    swapped = threading.Event()

    def hold_the_first(tokenizer: object) -> None:
        if tokenizer is old.loaded.tokenizer and not tokenizing.is_set():
            tokenizing.set()
            assert swapped.wait(30)

    with tokenized_in_a_thread(old.loaded.tokenizer, hold_the_first):
        pending = asyncio.create_task(service.start_async(GenerateRequest(prompt=PROMPT, max_tokens=4)))
        assert await asyncio.to_thread(tokenizing.wait, 30)
        new = await service.router.swap(str(folder), sha256=None)  # the same model as a new revision
        assert service.router.table.stable is new
        # Either the request holds the old revision, or the retired revision has been released.
        await eventually(lambda: old.leases > 0 or old.engine.model is None)
        swapped.set()
        generation = await pending
    result = await generation.result()
    assert generation.revision is old
    assert result.completion_tokens == 4
    assert await asyncio.to_thread(old.wait_released, 30)  # and it goes once the request is done


@pytest.mark.asyncio
async def test_latency_is_measured_from_arrival_including_tokenization(service: LMService) -> None:
    tokenized_at: list[float] = []
    revision = service.router.table.stable
    with tokenized_in_a_thread(revision.loaded.tokenizer, lambda _: tokenized_at.append(time.perf_counter())):
        generation = await service.start_async(GenerateRequest(prompt=PROMPT, max_tokens=2))
    await generation.result()
    assert tokenized_at
    assert generation.job.submitted_at < tokenized_at[0]  # request duration and TTFT start here
    assert generation.job.first_token_at is not None


@pytest.mark.asyncio
async def test_a_long_prompt_is_tokenized_off_the_event_loop(service: LMService) -> None:
    loop_thread = threading.get_ident()
    tokenizer = service.router.table.stable.loaded.tokenizer
    real = tokenizer.__call__
    threads: list[int] = []

    def spy(*args: object, **kwargs: object) -> object:
        threads.append(threading.get_ident())
        return real(*args, **kwargs)

    wide = LMService("m", service.router, prompts=service.prompts, limits=Limits(max_prompt_tokens=4000))
    long_prompt = "word " * 1000  # 5000 characters, about 1000 tokens: beyond the 512-position context
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: spy(*a, **k))
        with pytest.raises(ContextTooLongError):  # it was tokenized to know that
            await wide.start_async(GenerateRequest(prompt=long_prompt, max_tokens=1))
        short = await wide.start_async(GenerateRequest(prompt=PROMPT, max_tokens=2))
    assert threads[0] != loop_thread
    assert threads[-1] == loop_thread  # a short prompt stays on the loop
    assert (await short.result()).completion_tokens == 2
    assert service.router.table.stable.leases == 0
