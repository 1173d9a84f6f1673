"""Revisions of one served model, the alias that routes to them, and the atomic hot-swap.

A :class:`Revision` is one loaded artifact with its own decode engine. The :class:`Router` maps
requests to revisions through an immutable routing table (stable, optional canary and its
weight); a swap builds the new revision beside the serving one, warms it up with real requests
and then replaces the table in one assignment. A request holds a lease on the revision it
started on, so it finishes there; a replaced revision is released once its leases drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from autoglm_core.errors import AutoGLMError
from autoglm_inference.artifact import ArtifactError, LoadedArtifact, load
from autoglm_inference.detokenize import byte_pieces
from autoglm_inference.engine import Engine, Job
from autoglm_inference.options import EngineChoice

log = logging.getLogger(__name__)

WARMUP_PROMPT = "The quick brown fox"
WARMUP_TOKENS = 4
DRAIN_TIMEOUT_S = 600.0


class SwapInProgressError(AutoGLMError):
    """A repository operation on a model name while another one runs (409, retry)."""

    default_status = 409


class UnknownRevisionError(AutoGLMError, LookupError):
    """A model name or pinned revision this server does not serve (404)."""

    default_status = 404


class NoCanaryError(AutoGLMError):
    """Promote, rollback or weigh with no canary loaded, or a canary before any stable (409)."""

    default_status = 409


@dataclass
class Revision:
    """One loaded artifact and its engine. Requests hold a lease while they use it; once retired
    (swapped out) it stops when its last lease ends, and its weights are dropped by the engine's
    own thread when that thread ends, so nothing waits for it and nothing can keep them."""

    loaded: LoadedArtifact
    engine: Engine
    loaded_at: float = field(default_factory=time.time)
    _leases: int = 0
    _retired: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _released: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.engine.on_exit.append(self._drop_weights)

    @property
    def name(self) -> str:
        return self.loaded.artifact.revision

    @property
    def leases(self) -> int:
        return self._leases

    @property
    def released(self) -> bool:
        """Its engine has ended and its weights are dropped."""
        return self._released.is_set()

    def wait_released(self, timeout: float) -> bool:
        return self._released.wait(timeout)

    @contextlib.contextmanager
    def lease(self) -> Iterator[Revision]:
        with self._lock:
            self._leases += 1
        try:
            yield self
        finally:
            with self._lock:
                self._leases -= 1
                last = self._retired and self._leases == 0
            if last:
                self.stop()

    def retire(self) -> None:
        """Stop once the requests that hold a lease have ended (at once when none does)."""
        with self._lock:
            self._retired = True
            idle = self._leases == 0
        if idle:
            self.stop()

    def stop(self) -> None:
        """Stop now, leases or not: queued requests end ``unavailable``, running rows finish, then the
        engine's thread drops the weights. Never waits."""
        with self._lock:
            self._retired = True
        self.engine.stop(0)

    def describe(self) -> dict[str, object]:
        a = self.loaded.artifact
        return {
            "revision": a.revision, "uri": a.uri, "sha256": a.digest, "engine": self.loaded.engine,
            "inFlight": self.leases,
        }  # fmt: skip

    def _drop_weights(self) -> None:
        self.engine.release()
        self.loaded.model = None
        gc.collect()
        _return_freed_memory()
        self._released.set()
        log.info("released revision %s", self.name)


@dataclass(frozen=True)
class Table:
    stable: Revision
    canary: Revision | None = None
    canary_weight: float = 0.0  # percent of unpinned requests that go to the canary


EngineFactory = Callable[[LoadedArtifact], Engine]


class Router:
    """The revisions of one model name and the swap that replaces them."""

    def __init__(
        self,
        name: str,
        table: Table,
        *,
        make_engine: EngineFactory,
        cache_dir: Path,
        engine: EngineChoice = "auto",
        device: str = "cpu",
    ) -> None:
        self.name = name
        self.table = table
        self._make_engine = make_engine
        self._cache_dir = cache_dir
        self._how = _How(engine, device)
        self._swap = asyncio.Lock()
        self._swapping: str | None = None
        self._retired: list[Revision] = []  # swapped out, stopping once their leases end
        self.closed = False
        self._rng = random.Random()

    @classmethod
    def load_first(
        cls,
        name: str,
        uri: str,
        *,
        sha256: str | None,
        make_engine: EngineFactory,
        cache_dir: Path,
        engine: EngineChoice = "auto",
        device: str = "cpu",
    ) -> Router:
        """Load the first revision synchronously (server start)."""
        how = _How(engine, device)
        revision = _build(uri, sha256, make_engine, cache_dir, how)
        return cls(
            name,
            Table(stable=revision),
            make_engine=make_engine,
            cache_dir=cache_dir,
            engine=engine,
            device=device,
        )

    def revisions(self) -> list[Revision]:
        t = self.table
        return [t.stable] + ([t.canary] if t.canary is not None else [])

    def choose(self, pinned: str | None = None) -> Revision:
        """The revision for one request: the pinned one, else the canary by weight, else stable."""
        t = self.table  # one read: the whole request sees one table
        if pinned:
            for revision in (t.stable, t.canary):
                if revision is not None and revision.name == pinned:
                    return revision
            known = [r.name for r in (t.stable, t.canary) if r is not None]
            raise UnknownRevisionError(f"revision {pinned!r} is not served by {self.name}; served: {known}")
        if t.canary is not None and self._rng.random() * 100 < t.canary_weight:
            return t.canary
        return t.stable

    async def swap(self, uri: str, *, sha256: str | None, canary_weight: float | None = None) -> Revision:
        """Load ``uri`` beside what serves, warm it up, then flip the alias.

        ``canary_weight`` None makes it the stable revision (the old ones drain and are released);
        a number serves it as the canary with that percentage of unpinned traffic.
        """
        if self._swap.locked():
            raise SwapInProgressError(
                f"a swap of {self.name} to {self._swapping} is in progress; retry when it has finished"
            )
        async with self._swap:
            self._swapping = uri
            try:
                revision = await asyncio.to_thread(
                    _build, uri, sha256, self._make_engine, self._cache_dir, self._how
                )
                try:
                    await asyncio.to_thread(_warm_up, revision)
                    old = self.table
                    if self.closed:
                        raise ArtifactError(f"{self.name} was unloaded during the swap", status=409)
                    if canary_weight is not None and revision.name == old.stable.name:
                        raise ArtifactError(
                            f"{uri}: revision {revision.name} is already the stable revision", status=409
                        )
                except BaseException:
                    revision.stop()
                    raise
                if canary_weight is None:
                    self.table = Table(stable=revision)
                    retired = [r for r in (old.stable, old.canary) if r is not None and r is not revision]
                else:
                    self.table = Table(stable=old.stable, canary=revision, canary_weight=canary_weight)
                    retired = [old.canary] if old.canary is not None else []
                log.info("%s: now serving %s", self.name, self.describe())
                for r in retired:
                    self._retire(r)
                return revision
            finally:
                self._swapping = None

    def promote(self) -> Revision:
        t = self.table
        if t.canary is None:
            raise NoCanaryError(f"{self.name} has no canary to promote")
        self.table = Table(stable=t.canary)
        self._retire(t.stable)
        return t.canary

    def rollback(self) -> Revision:
        t = self.table
        if t.canary is None:
            raise NoCanaryError(f"{self.name} has no canary to roll back")
        self.table = Table(stable=t.stable)
        self._retire(t.canary)
        return t.canary

    def set_weight(self, weight: float) -> None:
        t = self.table
        if t.canary is None:
            raise NoCanaryError(f"{self.name} has no canary to weigh")
        self.table = Table(stable=t.stable, canary=t.canary, canary_weight=weight)

    def describe(self) -> dict[str, object]:
        t = self.table
        return {
            "stable": t.stable.describe(),
            "canary": t.canary.describe() if t.canary else None,
            "canaryWeight": t.canary_weight,
            "swapping": self._swapping,
        }

    async def close(self) -> None:
        """Unload: every revision, serving or retired, stops now (queued requests end ``unavailable``,
        running rows finish); each drops its weights when its engine's thread ends."""
        self.closed = True
        for revision in [*self.revisions(), *self._retired]:
            revision.stop()
        self._retired = []

    def _retire(self, revision: Revision) -> None:
        self._retired = [r for r in self._retired if not r.released] + [revision]
        revision.retire()
        # A lease held past the drain timeout (a client that never reads its stream) stops it anyway.
        ref = weakref.ref(revision)
        asyncio.get_running_loop().call_later(DRAIN_TIMEOUT_S, _stop_if_alive, ref)


@dataclass(frozen=True)
class _How:
    """Which runtime a name's revisions are loaded for (``--engine``) and on which device."""

    engine: EngineChoice = "auto"
    device: str = "cpu"


def _build(uri: str, sha256: str | None, make_engine: EngineFactory, cache_dir: Path, how: _How) -> Revision:
    loaded = load(uri, cache_dir=cache_dir, expected_sha256=sha256, engine=how.engine, device=how.device)
    _return_freed_memory()  # loading builds and drops a float model first
    byte_pieces(loaded.tokenizer)  # the streaming detokenizer's table: here, not on the first stream's loop
    return Revision(loaded=loaded, engine=make_engine(loaded).start())


def _warm_up(revision: Revision) -> None:
    """Real generations through the new engine; a model that cannot produce tokens is refused."""
    tokenizer = revision.loaded.tokenizer
    ids = tokenizer(WARMUP_PROMPT)["input_ids"]
    jobs = [Job(list(ids), WARMUP_TOKENS, request_id="warmup") for _ in range(2)]
    for job in jobs:
        revision.engine.submit(job)
    for job in jobs:
        if not job.wait(120):
            raise ArtifactError(f"{revision.loaded.artifact.uri}: warm-up did not finish in 120 s")
        if job.finish_reason == "error":
            raise ArtifactError(f"{revision.loaded.artifact.uri}: warm-up generation failed")


def _stop_if_alive(ref: weakref.ref[Revision]) -> None:
    revision = ref()
    if revision is not None:
        revision.stop()


def _return_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise, and RSS only grows)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
