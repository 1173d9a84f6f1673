"""The decode engine: one worker thread per loaded revision, dynamic and continuous batching.

Requests wait in a bounded queue. When the worker is idle it takes the first waiting request,
waits up to ``max_batch_delay_ms`` for more (up to ``max_batch_size``) and prefills them together.
While a batch is decoding, requests that arrive join it between decode steps (continuous
batching), and finished rows leave it, so a short request never waits for a long one.

Tokens are handed to the asyncio side as they are produced (streaming): at once, or, with a
``stream_interval_ms``, gathered and handed over at most that often (the first token and the end
always at once), so a CPU whose every core decodes wakes the event loop less. Each job also carries
its timings and its share of the energy the steps it took part in used.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from torch import nn

from autoglm_core.energy import EnergyMeter, EnergyReading, Method
from autoglm_inference.limits import QueueFullError
from autoglm_inference.runtime import Batch, Runtime, TorchRuntime
from autoglm_inference.sampling import Sampling

log = logging.getLogger(__name__)

#: ``unavailable``: the revision was unloaded before the job ran (the client should retry: 503).
FinishReason = Literal["stop", "length", "cancelled", "error", "unavailable"]


@dataclass
class Token:
    id: int


@dataclass
class Finished:
    reason: FinishReason
    error: str | None = None


Event = Token | Finished


@dataclass
class Job:
    """One generation request as the engine sees it."""

    prompt_ids: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    sampling: Sampling = field(default_factory=Sampling)
    request_id: str = ""
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    joules: float = 0.0
    energy_method: Method = "cpu-time-model"
    _loop: asyncio.AbstractEventLoop | None = None
    #: Events handed over and not read yet: the engine thread appends, the reader pops.
    _events: deque[Event] | None = None
    _reader: asyncio.Future[None] | None = None  # the reader waits on it while ``_events`` is empty
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _engine: Engine | None = None
    #: Seconds between hand-overs of tokens to the event loop (0: every token at once).
    _interval: float = 0.0
    _held: list[Event] = field(default_factory=list)  # the engine thread's, not yet handed over
    _handed_at: float = float("-inf")

    def cancel(self) -> None:
        """Stop generating for this job (client gone, stop sequence seen): a queued job leaves the
        queue at once (freeing its slot), a running row leaves the batch at the next step."""
        self._cancelled.set()
        if self._engine is not None:
            self._engine._withdraw(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def next_batch(self) -> list[Event]:
        """The events handed over since the last call (at least one; a ``Finished`` comes last, and
        nothing after it), so a reader that fell behind, or a job with a stream interval, handles
        several tokens at once. A coroutine, not an async generator: the streaming path runs it once
        per token on the thread that shares the cores with decode."""
        events, loop = self._events, self._loop
        assert events is not None, "submit the job from a running event loop first"
        assert loop is not None
        while not events:
            self._reader = loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        return [events.popleft() for _ in range(len(events))]

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (for callers without an event loop)."""
        return self._done.wait(timeout)

    def _emit(self, event: Event) -> None:
        if isinstance(event, Finished):
            self.finish_reason = event.reason
            self.finished_at = time.perf_counter()
            self._done.set()
        self._held.append(event)
        if isinstance(event, Finished) or time.perf_counter() - self._handed_at >= self._interval:
            self._flush()

    def _flush(self) -> None:
        """Hand over the events held back by the interval now (the end, or before a step that may take
        long)."""
        if not self._held:
            return
        self._handed_at = time.perf_counter()
        batch, self._held = self._held, []
        if self._loop is not None and self._events is not None:
            self._events.extend(batch)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                self._loop.call_soon_threadsafe(self._wake_reader)

    def _wake_reader(self) -> None:
        """On the event loop: the reader, if it waits, has events to read."""
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)


class EngineObserver(Protocol):
    """Told of each prefill and decode step on the engine's thread. ``on_step`` may hold what it
    records back (the step loop is the hot path); ``flush`` records it, and the engine calls it before
    a job's end goes out, so a client that saw its answer end finds its steps in the metrics."""

    def on_prefill(self, size: int) -> None: ...
    def on_step(self, rows: int, seconds: float) -> None: ...
    def flush(self) -> None: ...


class Engine:
    """Owns one runtime (a model and its KV cache) and the thread that decodes for it."""

    _ids = itertools.count(1)

    def __init__(
        self,
        model: nn.Module | Runtime,
        *,
        max_batch_size: int = 8,
        max_batch_delay_ms: float = 10.0,
        max_queue: int = 64,
        continuous: bool = True,
        meter: EnergyMeter | None = None,
        observer: EngineObserver | None = None,
        name: str = "",
        step_lock: threading.Lock | None = None,
        stream_interval_ms: float = 0.0,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_batch_delay_ms < 0 or stream_interval_ms < 0:
            raise ValueError(
                "max_batch_size >= 1, max_queue >= 1, max_batch_delay_ms >= 0 and stream_interval_ms >= 0"
                " are required"
            )
        self.stream_interval = stream_interval_ms / 1000
        self.runtime: Runtime | None = TorchRuntime(model) if isinstance(model, nn.Module) else model
        self.max_batch_size = max_batch_size
        self.max_batch_delay = max_batch_delay_ms / 1000
        self.max_queue = max_queue
        self.continuous = continuous and max_batch_size > 1
        self.meter = meter or EnergyMeter()
        self.observer = observer
        self.name = name or f"engine-{next(self._ids)}"
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._step_seconds = 0.05  # running estimate, for Retry-After
        # Engines sharing a device share this lock, so a step's energy reading is its own: the meter
        # reads process- or device-wide counters, which two engines stepping at once would both count.
        self._step_lock = step_lock or threading.Lock()
        #: Called once when the engine stops taking work (``stop``), on the caller's thread.
        self.on_stop: list[Callable[[], None]] = []
        #: Called once when the worker thread has ended (after ``stop``, when its last row finished),
        #: on that thread, or by ``stop`` for an engine that was never started.
        self.on_exit: list[Callable[[], None]] = []
        self._exited = threading.Event()

    # -- public API -----------------------------------------------------------------------------

    @property
    def model(self) -> nn.Module | None:
        """The torch model (None for another runtime, or once released)."""
        return getattr(self.runtime, "model", None)

    def release(self) -> None:
        """Drop the runtime's weights and cache (the worker thread has ended)."""
        runtime, self.runtime = self.runtime, None
        if runtime is not None:
            runtime.release()

    def start(self) -> Engine:
        with self._cond:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> bool:
        """Take nothing new: what waits ends ``unavailable``, running rows finish, then the worker
        thread ends and runs ``on_exit``. Waits up to ``timeout`` seconds for that (0: not at all);
        returns whether the thread has ended (False: still decoding)."""
        with self._cond:
            first = not self._stopping
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            never_started = self._thread is None
            self._cond.notify_all()
        for job in waiting:
            job._emit(Finished("unavailable", "the model revision was unloaded before this request ran"))
        if first:
            callbacks, self.on_stop = self.on_stop, []
            for callback in callbacks:
                callback()
            if never_started:
                self._exit()
        return self._exited.wait(timeout) if timeout > 0 else self._exited.is_set()

    @property
    def stopped(self) -> bool:
        """The worker thread has ended (or never started and ``stop`` was called)."""
        return self._exited.is_set()

    def submit(self, job: Job) -> Job:
        """Queue ``job``; raises ``QueueFullError`` when ``max_queue`` jobs already wait."""
        with contextlib.suppress(RuntimeError):
            job._loop = asyncio.get_running_loop()
            job._events = deque()
        with self._cond:
            if self._stopping:
                raise QueueFullError(self.max_queue, retry_after=1.0, reason="the revision is being unloaded")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(self.max_queue, retry_after=self.retry_after())
            job._engine = self
            job._interval = self.stream_interval
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def _withdraw(self, job: Job) -> None:
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return  # running (leaves at the next step) or already done
        job._emit(Finished("cancelled"))

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        """Jobs waiting or decoding; zero means drained."""
        with self._cond:
            return len(self._waiting) + len(self._running)

    def retry_after(self) -> float:
        """Seconds until a queue slot is likely free: one batch's worth of decode steps."""
        return max(1.0, round(self._step_seconds * 64, 1))

    # -- worker ---------------------------------------------------------------------------------

    def _take(self, limit: int, *, wait: bool) -> list[Job]:
        with self._cond:
            if wait:
                while not self._waiting and not self._stopping:
                    self._cond.wait(0.5)
                if self._waiting and self.max_batch_delay > 0:
                    deadline = time.perf_counter() + self.max_batch_delay
                    while len(self._waiting) < limit and not self._stopping:
                        left = deadline - time.perf_counter()
                        if left <= 0:
                            break
                        self._cond.wait(left)
            taken: list[Job] = []
            while self._waiting and len(taken) < limit:
                job = self._waiting.popleft()
                if job.cancelled:
                    job._emit(Finished("cancelled"))
                    continue
                taken.append(job)
            self._running.extend(taken)
            return taken

    def _run(self) -> None:
        try:
            self._work()
        finally:
            self._exit()  # after _work returned: its batch (and KV cache) is already gone

    def _exit(self) -> None:
        callbacks, self.on_exit = self.on_exit, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("%s: an exit callback failed", self.name)
        self._exited.set()

    def _work(self) -> None:
        batch: Batch | None = None
        busy = False  # rows decoded since the runtime was last told it is idle
        while True:
            try:
                if batch is None or batch.size == 0:
                    if busy and not self._waiting and self.runtime is not None:
                        self.runtime.idle()  # the last rows left (or failed) and nothing waits
                        busy = False
                    if self._stopping and not self._waiting:
                        return
                    batch = None
                    jobs = self._take(self.max_batch_size, wait=True)
                    if not jobs:
                        continue
                    busy = True
                    batch = self._prefill(jobs)
                    rows = jobs
                else:
                    rows = list(self._running)
                    if self.continuous and len(rows) < self.max_batch_size and self._waiting:
                        joining = self._take(self.max_batch_size - len(rows), wait=False)
                        if joining and self._join(batch, joining):
                            rows = list(self._running)
                            self._finish_rows(batch, rows, first_new=len(rows) - len(joining))
                            continue
                    self._timed_step(batch, rows)
                self._finish_rows(batch, rows, first_new=0)
            except Exception as exc:  # a failed forward fails its batch, never the worker
                log.exception("%s: decode step failed", self.name)
                if self.observer:
                    self.observer.flush()
                with self._cond:
                    failed, self._running = self._running, []
                for job in failed:
                    job._emit(Finished("error", f"{type(exc).__name__}: {exc}"))
                if batch is not None:  # give its rows' cache back (llama.cpp's sequence slots)
                    with contextlib.suppress(Exception):
                        batch.keep([])
                batch = None

    def _join(self, batch: Batch, joining: list[Job]) -> bool:
        """Prefill ``joining`` and merge it into ``batch``; a failure fails only the joiners."""
        for job in self._running:  # a long prompt's prefill must not hold back the others' tokens
            job._flush()
        try:
            batch.merge(self._prefill(joining))
        except Exception as exc:
            log.exception("%s: prefill of joining requests failed", self.name)
            with self._cond:
                self._running = [j for j in self._running if j not in joining]
            for job in joining:
                job._emit(Finished("error", f"{type(exc).__name__}: {exc}"))
            return False
        return True

    def _prefill(self, jobs: Sequence[Job]) -> Batch:
        if self.observer:
            self.observer.on_prefill(len(jobs))
        assert self.runtime is not None, "the runtime was released while the engine ran"
        with self._step_lock, self.meter.measure() as energy:
            batch = self.runtime.prefill([j.prompt_ids for j in jobs], [j.sampling for j in jobs])
        # A prefill's cost grows with the tokens it reads: each row pays for its prompt's share.
        self._charge(jobs, energy.reading, weights=[len(j.prompt_ids) for j in jobs])
        return batch

    def _timed_step(self, batch: Batch, rows: Sequence[Job]) -> None:
        start = time.perf_counter()
        with self._step_lock, self.meter.measure() as energy:
            batch.step()
        seconds = time.perf_counter() - start
        self._step_seconds = 0.9 * self._step_seconds + 0.1 * seconds
        self._charge(rows, energy.reading)
        if self.observer:
            self.observer.on_step(len(rows), seconds)

    @staticmethod
    def _charge(
        jobs: Sequence[Job], reading: EnergyReading | None, *, weights: Sequence[int] | None = None
    ) -> None:
        """Split a step's energy over its rows: by ``weights`` (prompt tokens), else equally (a
        decode step reads one token per row)."""
        assert reading is not None
        shares = [1] * len(jobs) if weights is None else [max(w, 1) for w in weights]
        total = sum(shares) or 1
        for job, share in zip(jobs, shares, strict=True):
            job.joules += reading.joules * share / total
            job.energy_method = reading.method

    def _finish_rows(self, batch: Batch, rows: list[Job], *, first_new: int) -> None:
        """Hand out the token rows ``rows[first_new:]`` just got; drop rows that are done. Rows
        before ``first_new`` (after a merge) handed theirs out in the last step."""
        tokens = batch.next_tokens()
        keep = []
        now = time.perf_counter()
        for index, (job, token) in enumerate(zip(rows, tokens, strict=True)):
            if index >= first_new:
                reason = self._deliver(job, token, now)
            else:
                reason = "cancelled" if job.cancelled else None
            if reason is None:
                keep.append(index)
            else:
                if self.observer:  # nothing held back after the first row to end here
                    self.observer.flush()
                job._emit(Finished(reason))
        if len(keep) < len(rows):
            batch.keep(keep)
            with self._cond:
                self._running = [rows[i] for i in keep]

    @staticmethod
    def _deliver(job: Job, token: int, now: float) -> FinishReason | None:
        if job.cancelled:
            return "cancelled"
        if job.first_token_at is None:
            job.first_token_at = now
        if token in job.stop_ids:
            return "stop"
        job.generated.append(token)
        job._emit(Token(token))
        if len(job.generated) >= job.max_new_tokens:
            return "length"
        return None


def run_jobs(engine: Engine, jobs: Sequence[Job], timeout: float = 600.0) -> list[Job]:
    """Submit ``jobs`` from a plain thread and wait for all of them (tests, benchmarks)."""
    for job in jobs:
        engine.submit(job)
    deadline = time.monotonic() + timeout
    for job in jobs:
        if not job.wait(max(deadline - time.monotonic(), 0)):
            raise TimeoutError(f"job {job.request_id or job.prompt_ids[:4]} did not finish in {timeout}s")
    return list(jobs)
