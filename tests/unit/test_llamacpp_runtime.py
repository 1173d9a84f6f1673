"""The llama.cpp runtime under the server's engine: greedy output equals transformers' ``generate()``
on the same weights (F32 GGUF), batching and continuous batching change no token, finished and
cancelled rows give their cache back, and quantized GGUF made by llama.cpp's quantizer serves."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoglm_inference.engine import Engine, Job, run_jobs
from autoglm_inference.sampling import Sampling
from autoglm_modeling.gguf_export import gguf_kind
from autoglm_modeling.loading import TRANSFORMERS_LOCK
from tests.support.llamacpp import needs_llama_cpp
from tests.support.tiny_models import gguf_folder, tiny_glm, tiny_llama

pytestmark = needs_llama_cpp

PROMPTS = [
    "Something is rotten in the state of Denmark",
    "To be, or not to be",
    "Frailty, thy name is woman",
    "The rest is silence",
]


@pytest.fixture(scope="module", params=["llama", "glm"])
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama, and a tiny GLM (llama.cpp's chatglm layout), each written as GGUF below."""
    make = tiny_llama if request.param == "llama" else tiny_glm
    return make(tmp_path_factory.mktemp(request.param) / "src", seed=7, init_std=0.3)


@pytest.fixture(scope="module")
def f32(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gguf_folder(source, tmp_path_factory.mktemp("gguf") / "f32") / "model.gguf"


def runtime(path: Path, rows: int = 4) -> object:
    from autoglm_inference.llamacpp import LlamaCppRuntime

    return LlamaCppRuntime(path, max_rows=rows, context=256, threads=2)


def prompt_ids(source: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(source)
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def transformers_greedy(source: Path, ids: list[int], n: int) -> list[int]:
    with TRANSFORMERS_LOCK:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
        )  # fmt: skip
    return [int(t) for t in out[0, len(ids) :]]


#: llama.cpp keeps its KV cache in F16: where transformers' best two logits are closer than this, the
#: pick may flip (a random GLM had one at 0.0024); any wider gap must pick the same token.
NEAR_TIE = 0.01


def test_greedy_output_equals_transformers_generate_for_32_tokens(source: Path, f32: Path) -> None:
    engine = Engine(runtime(f32), max_batch_size=1).start()  # type: ignore[arg-type]
    with TRANSFORMERS_LOCK:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    equal = 0
    try:
        for ids in prompt_ids(source):
            (job,) = run_jobs(engine, [Job(ids, 32)])
            expected = transformers_greedy(source, ids, 32)
            if job.generated == expected:
                equal += 1
                continue
            at = next(i for i, (a, b) in enumerate(zip(job.generated, expected, strict=True)) if a != b)
            with torch.no_grad():
                logits = model(torch.tensor([ids + expected[:at]])).logits[0, -1]
            best, second = logits.topk(2).values.tolist()
            assert best - second < NEAR_TIE, (
                f"token {at}: llama.cpp picked another token {best - second:.4f} behind"
            )
    finally:
        engine.stop()
    assert equal >= len(PROMPTS) - 1  # a near-tie is rare: most prompts decode the same 32 tokens


@pytest.mark.parametrize("continuous", [False, True])
def test_batched_rows_decode_the_same_tokens_as_alone(source: Path, f32: Path, continuous: bool) -> None:
    prompts = prompt_ids(source)
    alone_engine = Engine(runtime(f32), max_batch_size=1).start()  # type: ignore[arg-type]
    alone = [run_jobs(alone_engine, [Job(ids, 24)])[0].generated for ids in prompts]
    alone_engine.stop()
    engine = Engine(runtime(f32), max_batch_size=4, max_batch_delay_ms=50, continuous=continuous).start()  # type: ignore[arg-type]
    try:
        jobs = [Job(ids, 24) for ids in prompts]
        engine.submit(jobs[0])
        engine.submit(jobs[1])
        time.sleep(0.05)  # the others join a batch already decoding (continuous), or wait for it
        run_jobs(engine, jobs[2:])
        assert all(j.wait(60) for j in jobs)
        assert [j.generated for j in jobs] == alone
    finally:
        engine.stop()


def test_finished_and_cancelled_rows_give_their_sequence_slots_back(source: Path, f32: Path) -> None:
    prompts = prompt_ids(source)
    llama = runtime(f32, rows=2)
    engine = Engine(llama, max_batch_size=2, max_batch_delay_ms=0).start()  # type: ignore[arg-type]
    try:
        for round_ in range(5):  # 2 slots, 10 rows: a leaked slot would fail a later prefill
            long = engine.submit(Job(prompts[round_ % 4], 200))
            short = engine.submit(Job(prompts[(round_ + 1) % 4], 3))
            assert short.wait(30)
            assert short.finish_reason == "length"
            long.cancel()
            assert long.wait(30)
            assert long.finish_reason == "cancelled"
        (job,) = run_jobs(engine, [Job(prompts[0], 8)])
        assert job.finish_reason == "length"
        assert len(job.generated) == 8
        deadline = time.monotonic() + 10  # a row's slot is given back just after its last token is handed out
        while sorted(llama._free) != [0, 1] and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
        assert sorted(llama._free) == [0, 1]  # type: ignore[attr-defined]
    finally:
        engine.stop()


def test_seeded_sampling_repeats_and_differs_from_greedy(source: Path, f32: Path) -> None:
    ids = prompt_ids(source)[0]
    engine = Engine(runtime(f32), max_batch_size=2).start()  # type: ignore[arg-type]
    try:
        hot = Sampling(temperature=1.5, top_p=0.95, seed=11)
        a, b = run_jobs(engine, [Job(ids, 24, sampling=hot), Job(ids, 24, sampling=hot)])
        (greedy,) = run_jobs(engine, [Job(ids, 24)])
        assert a.generated == b.generated
        assert a.generated != greedy.generated
    finally:
        engine.stop()


def test_a_prompt_longer_than_the_context_fails_its_request_not_the_engine(source: Path, f32: Path) -> None:
    engine = Engine(runtime(f32), max_batch_size=2).start()  # type: ignore[arg-type]
    try:
        too_long = engine.submit(Job([5] * 300, 4))
        assert too_long.wait(30)
        assert too_long.finish_reason == "error"
        assert too_long.generated == []
        (fine,) = run_jobs(engine, [Job(prompt_ids(source)[0], 4)])
        assert fine.finish_reason == "length"
    finally:
        engine.stop()


# Of the F32 file: Q8_0 is 8.5 bits a weight, Q4_0 4.5 (the tiny model's embedding stays Q8_0).
@pytest.mark.parametrize(("kind", "smaller_than"), [("Q8_0", 0.32), ("Q4_0", 0.24)])
def test_llama_cpp_quantized_gguf_serves_and_is_smaller(
    source: Path, f32: Path, tmp_path: Path, kind: str, smaller_than: float
) -> None:
    folder = gguf_folder(source, tmp_path / kind, kind=kind)
    path = folder / "model.gguf"
    assert gguf_kind(path) == kind
    assert path.stat().st_size < f32.stat().st_size * smaller_than
    engine = Engine(runtime(path), max_batch_size=2).start()  # type: ignore[arg-type]
    try:
        jobs = run_jobs(engine, [Job(ids, 16) for ids in prompt_ids(source)])
        assert all(j.finish_reason == "length" and len(j.generated) == 16 for j in jobs)
    finally:
        engine.stop()


@pytest.mark.parametrize("kind", ["F32", "Q4_0"])
def test_the_persistent_thread_pool_decodes_what_fresh_threads_decode(
    source: Path, f32: Path, tmp_path: Path, kind: str
) -> None:
    """llama.cpp's workers kept between decodes (as llama-server keeps them) change no token. A pool
    made by another copy of ggml's libraries than the one decoding gave NaN logits with Q4_0's
    repacked weights (arg-max 0 every step)."""
    from autoglm_inference.llamacpp import LlamaCppRuntime

    path = f32 if kind == "F32" else gguf_folder(source, tmp_path / kind, kind=kind) / "model.gguf"
    generated = {}
    for poll in (50, None):
        llama = LlamaCppRuntime(path, max_rows=2, context=256, threads=2, poll=poll)
        assert (llama._pool is not None) == (poll is not None)
        engine = Engine(llama, max_batch_size=2).start()
        try:
            jobs = run_jobs(engine, [Job(ids, 24) for ids in prompt_ids(source)[:2]])
            generated[poll] = [j.generated for j in jobs]
        finally:
            engine.stop()
            engine.release()
    assert generated[50] == generated[None]
    assert all(len(set(tokens)) > 3 for tokens in generated[50]), generated  # not one token (NaN) again


def test_pools_sleep_when_their_engine_idles_or_another_decodes_in_turn(
    source: Path, f32: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A polling pool's workers spin for about 85 ms after each decode: an idle engine's pool is paused,
    and while two runtimes decode in turns (canary and stable) each pauses after every step."""
    from autoglm_modeling.ggml_threads import ThreadPool

    paused: list[int] = []
    real_pause = ThreadPool.pause
    monkeypatch.setattr(ThreadPool, "pause", lambda pool: (paused.append(id(pool)), real_pause(pool))[1])
    stable, canary = runtime(f32, rows=1), runtime(f32, rows=1)
    pools = {id(stable._pool): "stable", id(canary._pool): "canary"}  # type: ignore[attr-defined]
    engines = [Engine(r, max_batch_size=1).start() for r in (stable, canary)]  # type: ignore[arg-type]
    try:
        ids = prompt_ids(source)[0]
        run_jobs(engines[0], [Job(ids, 6)])
        deadline = time.monotonic() + 30  # the engine goes idle just after the job's end went out
        while not paused and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [pools[p] for p in paused] == ["stable"]  # alone: the pool polls between steps, then sleeps
        paused.clear()
        step = threading.Barrier(2)
        for engine in engines:  # in lockstep: from the second step on, the other is decoding too
            engine.observer = _Lockstep(step)
        jobs = [Job(ids, 6) for _ in engines]
        for engine, job in zip(engines, jobs, strict=True):
            engine.submit(job)
        assert all(job.wait(60) for job in jobs)
        assert all(engine.stop(30) for engine in engines)  # each tells its runtime it is idle first
        # steps 2 to 5 of each (at step 1 the other may not have begun), then idle
        assert [pools[p] for p in paused].count("stable") >= 5
        assert [pools[p] for p in paused].count("canary") >= 5
    finally:
        for engine in engines:
            engine.stop()
            engine.release()


class _Lockstep:
    """Holds each engine after every step until the other has made the same step."""

    def __init__(self, barrier: threading.Barrier) -> None:
        self.barrier = barrier

    def on_prefill(self, size: int) -> None:
        pass

    def on_step(self, rows: int, seconds: float) -> None:
        self.barrier.wait(30)

    def flush(self) -> None:
        pass


def test_without_a_thread_pool_the_runtime_says_why_and_decodes(
    source: Path, f32: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import ctypes

    from autoglm_inference.llamacpp import LlamaCppRuntime

    def missing(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)  # another platform's names, another build
    with caplog.at_level("INFO", logger="autoglm_modeling.ggml_threads"):
        llama = LlamaCppRuntime(f32, max_rows=1, context=256, threads=2)
    assert llama._pool is None
    assert "no persistent thread pool (libggml.so.0: cannot open" in caplog.text
    engine = Engine(llama, max_batch_size=1).start()
    try:
        (job,) = run_jobs(engine, [Job(prompt_ids(source)[0], 8)])
        assert len(job.generated) == 8
    finally:
        engine.stop()
        engine.release()


def test_releasing_the_engine_frees_the_llama_cpp_context_once(source: Path, f32: Path) -> None:
    llama = runtime(f32)
    engine = Engine(llama, max_batch_size=1).start()  # type: ignore[arg-type]
    done = threading.Event()
    engine.on_exit.append(done.set)
    run_jobs(engine, [Job(prompt_ids(source)[0], 4)])
    assert engine.stop(30)
    assert done.is_set()
    assert not llama._closed  # type: ignore[attr-defined]  (stopping alone keeps it: a revision releases it)
    engine.release()
    assert llama._closed  # type: ignore[attr-defined]
    assert engine.runtime is None
    llama.release()  # a second release frees nothing twice (no double free, no crash)


def test_perplexity_on_llama_cpp_equals_transformers_on_the_same_weights(source: Path, f32: Path) -> None:
    import math

    from tests.support.tiny_models import hamlet_path

    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(hamlet_path().read_text()[5000:6500])["input_ids"][:200]
    llama = runtime(f32)
    nll, count = llama.negative_log_likelihood(ids)  # type: ignore[attr-defined]
    with TRANSFORMERS_LOCK:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()  # mean NLL over ids[1:]
    assert count == len(ids) - 1
    assert math.exp(nll / count) == pytest.approx(math.exp(expected), rel=1e-4)
    assert sorted(llama._free) == [0, 1, 2, 3]  # type: ignore[attr-defined]  (its slot is back)
