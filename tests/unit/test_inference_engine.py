"""The decode engine: batched greedy output equals unbatched, rows join and leave, limits hold."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator

import pytest
import torch
from transformers import AutoModelForCausalLM

from autoglm_core.energy import EnergyMeter, EnergyReading
from autoglm_inference.engine import Engine, Event, Finished, Job, Token, run_jobs
from autoglm_inference.generation import DecodeBatch
from autoglm_inference.limits import QueueFullError
from autoglm_inference.sampling import Sampling
from tests.support.tiny_models import tiny_glm

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14, 15], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [7]]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    folder = tiny_glm(tmp_path_factory.mktemp("tiny") / "m", init_std=0.3, seed=3)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def alone(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    batch = DecodeBatch.prefill(model, [prompt], [Sampling()])
    out = [int(batch.tokens[0])]
    while len(out) < n:
        out.append(int(batch.step(model)[0]))
    return out


def test_the_model_under_test_is_not_degenerate(model: torch.nn.Module) -> None:
    outputs = [alone(model, p, 10) for p in PROMPTS]
    assert len({tuple(o) for o in outputs}) == len(PROMPTS)
    assert all(len(set(o)) > 3 for o in outputs), outputs


def test_rows_joining_and_leaving_decode_what_they_decode_alone(model: torch.nn.Module) -> None:
    expected = [alone(model, p, 12) for p in PROMPTS[:3]]
    batch = DecodeBatch.prefill(model, PROMPTS[:2], [Sampling()] * 2)
    outs = [[int(t)] for t in batch.tokens]
    finished = []
    for step in range(11):
        if step == 3:
            joining = DecodeBatch.prefill(model, [PROMPTS[2]], [Sampling()])
            batch.merge(joining)
            outs.append([int(joining.tokens[0])])
        if step == 6:
            batch.keep([0, 2])
            finished.append(outs.pop(1))
        for row, token in enumerate(batch.step(model).tolist()):
            outs[row].append(token)
    assert outs[0] == expected[0]
    assert finished[0] == expected[1][: len(finished[0])]
    assert outs[1] == expected[2][: len(outs[1])]


@pytest.mark.parametrize(("batch_size", "continuous"), [(1, False), (4, False), (4, True), (8, True)])
def test_engine_output_equals_unbatched_greedy(
    model: torch.nn.Module, batch_size: int, continuous: bool
) -> None:
    lengths = [9, 3, 12, 6, 1]
    expected = [alone(model, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    engine = Engine(model, max_batch_size=batch_size, max_batch_delay_ms=20, continuous=continuous).start()
    try:
        jobs = run_jobs(engine, [Job(p, n) for p, n in zip(PROMPTS, lengths, strict=True)])
    finally:
        engine.stop()
    assert [j.generated for j in jobs] == expected
    assert all(j.finish_reason == "length" for j in jobs)
    assert all(j.joules > 0 for j in jobs)


def test_a_stop_token_ends_the_row_without_being_emitted(model: torch.nn.Module) -> None:
    expected = alone(model, PROMPTS[0], 10)
    stop = expected[4]
    engine = Engine(model).start()
    try:
        (job,) = run_jobs(engine, [Job(PROMPTS[0], 10, stop_ids=frozenset({stop}))])
    finally:
        engine.stop()
    assert job.finish_reason == "stop"
    assert job.generated == expected[: expected.index(stop)]


def test_a_full_queue_refuses_with_retry_after(model: torch.nn.Module) -> None:
    engine = Engine(model, max_queue=2)  # not started: nothing leaves the queue
    engine.submit(Job([1], 1))
    engine.submit(Job([1], 1))
    with pytest.raises(QueueFullError) as refused:
        engine.submit(Job([1], 1))
    assert refused.value.status == 429
    assert refused.value.retry_after >= 1
    assert "max_queue" in refused.value.message


def test_cancelled_jobs_leave_the_batch_and_others_go_on(model: torch.nn.Module) -> None:
    engine = Engine(model, max_batch_size=4, max_batch_delay_ms=50).start()
    try:
        long_job = Job(PROMPTS[0], 400)
        short_job = Job(PROMPTS[1], 5)
        engine.submit(long_job)
        engine.submit(short_job)
        assert short_job.wait(60)
        long_job.cancel()
        assert long_job.wait(60)
    finally:
        engine.stop()
    assert long_job.finish_reason == "cancelled"
    assert 0 < len(long_job.generated) < 400
    assert short_job.generated == alone(model, PROMPTS[1], 5)


def test_a_failing_forward_fails_its_batch_and_the_engine_keeps_serving(model: torch.nn.Module) -> None:
    calls = {"n": 0}
    real_forward = model.forward
    lock = threading.Lock()

    def flaky(*args: object, **kwargs: object) -> object:
        with lock:
            calls["n"] += 1
            first = calls["n"] == 1
        if first:
            raise RuntimeError("simulated out of memory")
        return real_forward(*args, **kwargs)

    engine = Engine(model, max_batch_delay_ms=0).start()
    try:
        model.forward = flaky  # type: ignore[method-assign]
        (failed,) = run_jobs(engine, [Job(PROMPTS[0], 3)])
        (served,) = run_jobs(engine, [Job(PROMPTS[0], 3)])
    finally:
        model.forward = real_forward  # type: ignore[method-assign]
        engine.stop()
    assert failed.finish_reason == "error"
    assert served.generated == alone(model, PROMPTS[0], 3)


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(model: torch.nn.Module) -> None:
    sampling = Sampling(temperature=1.5, top_p=0.95, seed=7)
    engine = Engine(model, max_batch_size=4).start()
    try:
        a, b = run_jobs(
            engine, [Job(PROMPTS[3], 16, sampling=sampling), Job(PROMPTS[3], 16, sampling=sampling)]
        )
    finally:
        engine.stop()
    assert a.generated == b.generated
    assert a.generated != alone(model, PROMPTS[3], 16)


def test_cancelled_queued_jobs_give_their_queue_slots_back(model: torch.nn.Module) -> None:
    engine = Engine(model, max_queue=2)  # not started: nothing leaves the queue by decoding
    gone = [engine.submit(Job([1], 1)), engine.submit(Job([1], 1))]
    for job in gone:
        job.cancel()
    assert engine.queue_depth == 0
    assert all(job.finish_reason == "cancelled" for job in gone)
    engine.submit(Job([1], 1))  # a live client is not refused because of dead ones


def test_stopping_the_engine_ends_queued_jobs_unavailable(model: torch.nn.Module) -> None:
    engine = Engine(model)  # not started
    queued = engine.submit(Job([1], 1))
    engine.stop()
    assert queued.finish_reason == "unavailable"


def test_a_failing_joiner_fails_alone(model: torch.nn.Module) -> None:
    engine = Engine(model, max_batch_size=4, max_batch_delay_ms=0).start()
    try:
        running = engine.submit(Job(PROMPTS[0], 40))
        deadline = time.monotonic() + 30
        while not running.generated:  # decoding: the next request joins a running batch
            assert time.monotonic() < deadline, "the first row never produced a token"
            threading.Event().wait(0.005)
        bad = engine.submit(Job([10**9], 3))  # an id beyond the vocabulary: its prefill fails
        assert bad.wait(60)
        assert running.wait(60)
    finally:
        engine.stop()
    assert bad.finish_reason == "error"
    assert running.finish_reason == "length"
    assert running.generated == alone(model, PROMPTS[0], 40)


def test_greedy_output_equals_transformers_generate(model: torch.nn.Module) -> None:
    prompt = PROMPTS[3]
    expected = model.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()
    engine = Engine(model, max_batch_size=4).start()
    try:
        jobs = run_jobs(engine, [Job(prompt, 12), Job(PROMPTS[0], 5), Job(PROMPTS[1], 9)])
    finally:
        engine.stop()
    assert jobs[0].generated == expected


class OneJoulePerStep(EnergyMeter):
    """Every prefill and decode step costs exactly 1 J."""

    class _Step:
        reading: EnergyReading | None = None

        def __enter__(self) -> OneJoulePerStep._Step:
            return self

        def __exit__(self, *_: object) -> None:
            self.reading = EnergyReading(joules=1.0, seconds=0.0, method="cpu-time-model")

    def measure(self) -> OneJoulePerStep._Step:  # type: ignore[override]
        return self._Step()


def test_prefill_energy_is_split_by_prompt_tokens_and_decode_energy_equally(model: torch.nn.Module) -> None:
    engine = Engine(model, max_batch_size=2, max_batch_delay_ms=0, meter=OneJoulePerStep())
    short, long = engine.submit(Job([5, 6], 3)), engine.submit(Job([5, 6, 7, 8, 9, 10, 11, 12], 3))
    engine.start()  # both wait already: one prefill of both rows, then two decode steps of both
    try:
        assert short.wait(60)
        assert long.wait(60)
    finally:
        engine.stop()
    # Prefill: 1 J over 2 + 8 prompt tokens; each decode step: 1 J over 2 rows.
    assert short.joules == pytest.approx(0.2 + 2 * 0.5)
    assert long.joules == pytest.approx(0.8 + 2 * 0.5)


async def read_batches(job: Job) -> AsyncIterator[list[Event]]:
    """``Job.next_batch`` until the ``Finished`` event, as the server's reader reads."""
    while True:
        batch = await job.next_batch()
        yield batch
        if isinstance(batch[-1], Finished):
            return


async def _batches(engine: Engine, job: Job) -> list[list[object]]:
    engine.submit(job)
    return [batch async for batch in read_batches(job)]


@pytest.mark.parametrize("interval_ms", [0, 60_000])
def test_a_stream_interval_gathers_tokens_but_hands_over_the_first_at_once(
    model: torch.nn.Module, interval_ms: float
) -> None:
    """``--stream-interval-ms``: the first token alone (time to first token is not held back), the
    rest at most that often; the tokens are those of greedy decoding alone, whatever the gathering."""
    expected = alone(model, PROMPTS[0], 12)
    engine = Engine(model, max_batch_delay_ms=0, stream_interval_ms=interval_ms).start()
    try:
        job = Job(PROMPTS[0], 12)
        batches = asyncio.run(_batches(engine, job))
    finally:
        engine.stop()
    tokens = [e.id for batch in batches for e in batch if isinstance(e, Token)]
    assert tokens == expected == job.generated
    last = batches[-1][-1]
    assert isinstance(last, Finished)
    assert last.reason == "length"
    assert len(batches[0]) == 1
    assert isinstance(batches[0][0], Token)
    if interval_ms:  # an interval longer than the whole job: everything after the first comes with the end
        assert len(batches) == 2
        assert len(batches[1]) == 12
    else:  # every token its own hand-over; a reader that keeps up sees each alone
        assert sum(len(b) for b in batches) == 13


def test_held_tokens_are_handed_over_before_a_joining_prefill(model: torch.nn.Module) -> None:
    """Tokens gathered by the interval go out before new requests' prefill, which may take long."""
    engine = Engine(model, max_batch_size=4, max_batch_delay_ms=0, stream_interval_ms=60_000).start()

    async def scenario() -> tuple[list[list[object]], list[list[object]]]:
        first = Job(PROMPTS[4], 100)
        engine.submit(first)
        seen: list[list[object]] = []
        late = Job(PROMPTS[1], 3)
        async for batch in read_batches(first):
            seen.append(batch)
            if len(seen) == 1:  # the first token is out, the next ones are held: now a request joins
                while len(first.generated) < 3:
                    await asyncio.sleep(0.0005)
                engine.submit(late)
        return seen, [b async for b in read_batches(late)]

    try:
        seen, late_batches = asyncio.run(scenario())
    finally:
        engine.stop()
    assert isinstance(seen[-1][-1], Finished)
    # without the flush before the join, the first job's tokens would all wait for its end
    assert len(seen) >= 3, [len(b) for b in seen]
    assert [e.id for b in late_batches for e in b if isinstance(e, Token)] == alone(model, PROMPTS[1], 3)


def test_a_negative_stream_interval_is_refused(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="stream_interval_ms >= 0"):
        Engine(model, stream_interval_ms=-1)


class _HoldingObserver:
    """Holds every step back until ``flush``, as the server's observer does in bursts."""

    def __init__(self) -> None:
        self.held: list[int] = []
        self.recorded: list[int] = []

    def on_prefill(self, size: int) -> None:
        pass

    def on_step(self, rows: int, seconds: float) -> None:
        self.held.append(rows)

    def flush(self) -> None:
        self.recorded += self.held
        self.held = []


def test_a_jobs_steps_are_recorded_before_its_end_goes_out(model: torch.nn.Module) -> None:
    observer = _HoldingObserver()
    at_end: dict[int, list[int]] = {}

    class Watched(Job):
        def _emit(self, event: Token | Finished) -> None:
            if isinstance(event, Finished):  # what the metrics held when this end went out
                at_end[self.max_new_tokens] = list(observer.recorded)
            super()._emit(event)

    engine = Engine(model, max_batch_size=2, max_batch_delay_ms=1000, observer=observer).start()
    try:
        run_jobs(engine, [Watched(PROMPTS[0], 4), Watched(PROMPTS[1], 9)])
        # 4 tokens: the prefill gave the first, 3 steps of 2 rows the rest; 9: then 5 steps alone
        assert at_end == {4: [2, 2, 2], 9: [2, 2, 2] + [1] * 5}
    finally:
        engine.stop()


@pytest.mark.parametrize("pace", ["lock-step", "flood"])
def test_every_event_handed_over_from_the_engine_thread_reaches_the_reader_in_order(
    model: torch.nn.Module, pace: str
) -> None:
    """The hand-over between the engine's thread and the event loop (a deque and a future, no
    asyncio.Queue) loses no event and no wake-up. Lock-step: each event is emitted as the reader goes
    back to wait for the next, with the threads switching as often as the interpreter can; a reader
    left asleep times the emitter out. Flood: thousands emitted as fast as a thread can to a reader
    that dawdles: all arrive, in order, several at a time."""
    engine = Engine(model, max_batch_delay_ms=0)  # not started: this test's thread plays its worker
    count = 2000 if pace == "lock-step" else 5000
    seen = threading.Event()
    stuck: list[int] = []

    async def scenario() -> list[list[object]]:
        job = engine.submit(Job(PROMPTS[0], count))

        def emit() -> None:
            for i in range(count):
                job._emit(Token(i))
                if pace == "lock-step":
                    if not seen.wait(10):
                        stuck.append(i)
                        break
                    seen.clear()
            job._emit(Finished("length"))

        thread = threading.Thread(target=emit)
        thread.start()
        batches: list[list[object]] = []
        try:
            async with asyncio.timeout(60):
                async for batch in read_batches(job):
                    batches.append(batch)
                    seen.set()
                    if pace == "flood" and len(batches) % 7 == 0:
                        await asyncio.sleep(0.002)
        finally:
            thread.join()
        return batches

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads interleave between almost any two bytecodes: races show
    try:
        batches = asyncio.run(scenario())
    finally:
        sys.setswitchinterval(switch)
    assert not stuck, f"event {stuck[0]} was handed over but the reader never woke for it"
    events = [e for batch in batches for e in batch]
    assert [e.id for e in events[:-1] if isinstance(e, Token)] == list(range(count))
    assert events[-1] == Finished("length")
    assert all(batch for batch in batches)  # never an empty hand-over
    if pace == "flood":
        assert len(batches) < count  # a reader that fell behind took several events at once
