"""The feedback store: the servers' request log and the feedback that rates those requests.

One database (a SQLAlchemy URL: SQLite on one machine, PostgreSQL in a cluster, where every replica
of a model server and the feedback API share it), two tables:

- ``requests``: one row per answered request (``RequestRecord``), written by the server that
  answered, in the background (``RequestLog``: a bounded buffer flushed every ``flush_seconds`` by
  one thread, so the event loop never waits on the database). Bounded: the newest ``max_requests``
  rows are kept. Durable: a server restart reopens the same rows.
- ``feedback``: one row per (request_id, source), joined at ingest to the request it rates
  (revision, prompt variant, target copied in), so the aggregates need no join and survive the
  request's eviction. A second event for the same pair is a duplicate and changes nothing.

Accepted feedback is committed before the API answers: the table is also the spool the feature
pipeline (``autoglm_feedback.features``) reads in micro-batches by ``id``, marking what it pushed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from autoglm_core.feedback.records import MAX_TEXT_CHARS, Accepted, FeedbackIn, RequestRecord

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUESTS: Final = 100_000
URL_ENV: Final = "AUTOGLM_FEEDBACK_URL"

metadata = MetaData()
requests_table = Table(
    "autoglm_requests",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("time", Float, nullable=False),
    Column("model", String(253), nullable=False),
    Column("revision", String(128), nullable=False),
    Column("prompt_variant", String(63), nullable=False),
    Column("target", String(63), nullable=False),
    Column("latency_s", Float, nullable=False),
    Column("ttft_s", Float),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("joules", Float, nullable=False),
    Column("energy_method", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("output", Text, nullable=False),
    Index("autoglm_requests_model_time", "model", "time"),
)
feedback_table = Table(
    "autoglm_feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(128), nullable=False),
    Column("source", String(64), nullable=False),
    Column("time", Float, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("raw", String(64), nullable=False),
    Column("score", Float, nullable=False),
    Column("correction", Text),
    Column("labels", Text, nullable=False),
    Column("model", String(253), nullable=False),
    Column("revision", String(128), nullable=False),
    Column("prompt_variant", String(63), nullable=False),
    Column("target", String(63), nullable=False),
    Column("pushed", Boolean, nullable=False, default=False),
    UniqueConstraint("request_id", "source", name="autoglm_feedback_once"),
    Index("autoglm_feedback_pushed", "pushed", "id"),
    Index("autoglm_feedback_model_time", "model", "time"),
)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (the feature pipeline) never block the server
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def open_engine(url: str) -> Engine:
    """An engine on ``url`` with the tables created; a SQLite file's folder is created too."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        from pathlib import Path

        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    metadata.create_all(engine)
    return engine


@dataclass(frozen=True)
class RequestTotals:
    requests: int
    errors: int
    joules: float
    completion_tokens: int


@dataclass(frozen=True)
class FeedbackRow:
    """A stored feedback event, as the feature pipeline and retraining read it."""

    id: int
    request_id: str
    source: str
    time: float
    kind: str
    score: float
    correction: str | None
    labels: dict[str, str]
    model: str
    revision: str
    prompt_variant: str
    target: str


@dataclass(frozen=True)
class RatedRequest:
    """A feedback event with the request it rates: what retraining learns from."""

    request_id: str
    time: float
    revision: str
    prompt_variant: str
    score: float
    correction: str | None
    prompt: str
    output: str


class FeedbackStore:
    """Reads and writes of both tables; safe to share between threads."""

    def __init__(self, url: str, *, max_requests: int = DEFAULT_MAX_REQUESTS) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {max_requests}")
        self.url = url
        self.engine = open_engine(url)
        self.max_requests = max_requests
        self._since_trim = 0

    def close(self) -> None:
        self.engine.dispose()

    # -- requests ---------------------------------------------------------------------------------

    def add_requests(self, records: Sequence[RequestRecord]) -> None:
        """Insert ``records`` (a request id seen before keeps its first row), then trim to the bound."""
        if not records:
            return
        rows = [_request_row(r) for r in records]
        with self.engine.begin() as conn:
            known = set(
                conn.scalars(
                    select(requests_table.c.request_id).where(
                        requests_table.c.request_id.in_([r["request_id"] for r in rows])
                    )
                )
            )
            fresh = {r["request_id"]: r for r in rows if r["request_id"] not in known}
            if fresh:
                conn.execute(insert(requests_table), list(fresh.values()))
        self._since_trim += len(rows)
        if self._since_trim >= max(1, self.max_requests // 10):
            self.trim()

    def trim(self) -> int:
        """Delete all but the newest ``max_requests`` request rows; how many went."""
        self._since_trim = 0
        with self.engine.begin() as conn:
            cutoff = conn.scalar(
                select(requests_table.c.time)
                .order_by(requests_table.c.time.desc())
                .offset(self.max_requests)
                .limit(1)
            )
            if cutoff is None:
                return 0
            return int(conn.execute(delete(requests_table).where(requests_table.c.time <= cutoff)).rowcount)

    def request(self, request_id: str) -> RequestRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(requests_table).where(requests_table.c.request_id == request_id)
            ).first()
        return RequestRecord(**row._mapping) if row is not None else None

    def request_totals(self, model: str) -> dict[tuple[str, str], RequestTotals]:
        """Per (revision, prompt variant) of ``model``: requests that ran to the end or failed (not
        the cancelled), errors, joules and generated tokens, over what the log keeps."""
        t = requests_table
        query = (
            select(
                t.c.revision, t.c.prompt_variant, func.count(), func.sum(case((t.c.status == "error", 1), else_=0)),
                func.sum(t.c.joules), func.sum(t.c.completion_tokens),
            )
            .where(t.c.model == model, t.c.status != "cancelled")
            .group_by(t.c.revision, t.c.prompt_variant)
        )  # fmt: skip
        with self.engine.connect() as conn:
            return {
                (r[0], r[1]): RequestTotals(int(r[2]), int(r[3] or 0), float(r[4] or 0.0), int(r[5] or 0))
                for r in conn.execute(query)
            }

    def latencies(self, model: str, revision: str, variant: str, *, limit: int) -> list[float]:
        """The latencies (s) of the newest ``limit`` requests of a key that answered without error."""
        t = requests_table
        query = (
            select(t.c.latency_s)
            .where(
                t.c.model == model,
                t.c.revision == revision,
                t.c.prompt_variant == variant,
                t.c.status == "ok",
            )
            .order_by(t.c.time.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [float(v) for v in conn.scalars(query)]

    def recent_requests(self, model: str, revision: str | None, *, limit: int) -> list[RequestRecord]:
        """The newest ``limit`` requests of ``model`` (of one revision, or of all), oldest first."""
        t = requests_table
        where = [t.c.model == model] + ([t.c.revision == revision] if revision is not None else [])
        query = select(t).where(*where).order_by(t.c.time.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [RequestRecord(**row._mapping) for row in conn.execute(query)][::-1]

    def first_requests_alone(self, model: str, revision: str, *, limit: int) -> list[RequestRecord]:
        """The oldest ``limit`` requests of ``revision`` since it served alone: after the newest
        request of any other revision of ``model`` (a canary's split, a baseline before it)."""
        t = requests_table
        others = (
            select(func.max(t.c.time)).where(t.c.model == model, t.c.revision != revision).scalar_subquery()
        )
        query = (
            select(t)
            .where(t.c.model == model, t.c.revision == revision, t.c.time > func.coalesce(others, -1.0))
            .order_by(t.c.time)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [RequestRecord(**row._mapping) for row in conn.execute(query)]

    def feedback_totals(self, model: str) -> dict[tuple[str, str], tuple[int, float]]:
        """Per (revision, prompt variant) of ``model``: feedback events and the sum of their scores."""
        f = feedback_table
        query = (
            select(f.c.revision, f.c.prompt_variant, func.count(), func.sum(f.c.score))
            .where(f.c.model == model)
            .group_by(f.c.revision, f.c.prompt_variant)
        )
        with self.engine.connect() as conn:
            return {(r[0], r[1]): (int(r[2]), float(r[3] or 0.0)) for r in conn.execute(query)}

    def scores_of(self, request_ids: Sequence[str]) -> list[float]:
        """The feedback scores given to these requests."""
        if not request_ids:
            return []
        query = select(feedback_table.c.score).where(feedback_table.c.request_id.in_(list(request_ids)))
        with self.engine.connect() as conn:
            return [float(v) for v in conn.scalars(query)]

    def count_requests(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(requests_table)) or 0)

    # -- feedback ---------------------------------------------------------------------------------

    def accept(self, events: Iterable[FeedbackIn], *, now: float | None = None) -> list[Accepted]:
        """Store each event joined to its request: ``accepted``, ``duplicate`` (the same request and
        source was rated before: the first stays) or ``unknown_request`` (no such request in the
        log). All of a batch is committed in one transaction before this returns."""
        events = list(events)
        now = time.time() if now is None else now
        results: list[Accepted] = []
        with self.engine.begin() as conn:
            ids = list({e.request_id for e in events})
            served = {
                row.request_id: row
                for row in conn.execute(
                    select(
                        requests_table.c.request_id, requests_table.c.model, requests_table.c.revision,
                        requests_table.c.prompt_variant, requests_table.c.target,
                    ).where(requests_table.c.request_id.in_(ids))
                )
            }  # fmt: skip
            seen = {
                (row.request_id, row.source)
                for row in conn.execute(
                    select(feedback_table.c.request_id, feedback_table.c.source).where(
                        feedback_table.c.request_id.in_(ids)
                    )
                )
            }
            rows = []
            for e in events:
                req = served.get(e.request_id)
                if req is None:
                    results.append(Accepted(e.request_id, e.source, "unknown_request"))
                    continue
                kind, score = e.normalised()
                if (e.request_id, e.source) in seen:
                    results.append(Accepted(e.request_id, e.source, "duplicate"))
                    continue
                done = Accepted(
                    e.request_id,
                    e.source,
                    "accepted",
                    score,
                    kind,
                    req.revision,
                    req.prompt_variant,
                    req.model,
                    req.target,
                )
                seen.add((e.request_id, e.source))
                rows.append({
                    "request_id": e.request_id, "source": e.source, "time": now, "kind": kind,
                    "raw": json.dumps(e.score)[:64], "score": score, "correction": e.correction,
                    "labels": json.dumps(e.labels, sort_keys=True), "model": req.model,
                    "revision": req.revision, "prompt_variant": req.prompt_variant, "target": req.target,
                    "pushed": False,
                })  # fmt: skip
                results.append(done)
            if rows:
                try:
                    conn.execute(insert(feedback_table), rows)
                except IntegrityError:  # another writer stored one of these pairs meanwhile: one by one
                    conn.rollback()
                    return self._accept_one_by_one(events, now)
        return results

    def _accept_one_by_one(self, events: list[FeedbackIn], now: float) -> list[Accepted]:
        results = []
        for e in events:
            try:
                results.extend(self.accept([e], now=now))
            except IntegrityError:
                results.append(Accepted(e.request_id, e.source, "duplicate"))
        return results

    def unpushed(self, limit: int = 1000) -> list[FeedbackRow]:
        """The oldest feedback the feature pipeline has not pushed yet (the spool)."""
        query = (
            select(feedback_table).where(~feedback_table.c.pushed).order_by(feedback_table.c.id).limit(limit)
        )
        with self.engine.connect() as conn:
            return [_feedback_row(row._mapping) for row in conn.execute(query)]

    def mark_pushed(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self.engine.begin() as conn:
            conn.execute(update(feedback_table).where(feedback_table.c.id.in_(list(ids))).values(pushed=True))

    def rated_requests(self, model: str, *, limit: int) -> list[RatedRequest]:
        """The newest ``limit`` feedback events of ``model`` joined to the requests they rate (those
        the bounded log still keeps), oldest first; a request rated by several sources comes once per
        event."""
        f, r = feedback_table, requests_table
        query = (
            select(f.c.request_id, f.c.time, f.c.revision, f.c.prompt_variant, f.c.score, f.c.correction,
                   r.c.prompt, r.c.output)
            .join(r, r.c.request_id == f.c.request_id)
            .where(f.c.model == model)
            .order_by(f.c.time.desc(), f.c.id.desc())
            .limit(limit)
        )  # fmt: skip
        with self.engine.connect() as conn:
            return [RatedRequest(**row._mapping) for row in conn.execute(query)][::-1]

    def count_feedback(self, *, pushed: bool | None = None) -> int:
        query = select(func.count()).select_from(feedback_table)
        if pushed is not None:
            query = query.where(feedback_table.c.pushed == pushed)
        with self.engine.connect() as conn:
            return int(conn.scalar(query) or 0)


def _request_row(record: RequestRecord) -> dict[str, Any]:
    row = asdict(record)
    row["prompt"] = record.prompt[:MAX_TEXT_CHARS]
    row["output"] = record.output[:MAX_TEXT_CHARS]
    return row


def _feedback_row(row: Any) -> FeedbackRow:
    return FeedbackRow(
        id=row["id"], request_id=row["request_id"], source=row["source"], time=row["time"], kind=row["kind"],
        score=row["score"], correction=row["correction"], labels=json.loads(row["labels"] or "{}"),
        model=row["model"], revision=row["revision"], prompt_variant=row["prompt_variant"], target=row["target"],
    )  # fmt: skip


class RequestLog:
    """The server's writer of request records: ``record`` only appends to a bounded buffer; one
    thread writes the buffer every ``flush_seconds`` (or sooner when ``batch`` are waiting).
    ``flush`` writes what is buffered now (before feedback is joined, and at shutdown). If the
    database is down, records wait in the buffer (the oldest are dropped past ``max_buffered``,
    counted in ``dropped``) and the server keeps answering."""

    def __init__(
        self,
        store: FeedbackStore,
        *,
        flush_seconds: float = 0.2,
        batch: int = 256,
        max_buffered: int = 10_000,
    ) -> None:
        self.store = store
        self.flush_seconds = flush_seconds
        self.batch = batch
        self.dropped = 0
        self._buffer: deque[RequestRecord] = deque(maxlen=max_buffered)
        self._lock = threading.Lock()  # one writer at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autoglm-request-log", daemon=True)
        self._thread.start()

    def record(self, record: RequestRecord) -> None:
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1
        self._buffer.append(record)
        if len(self._buffer) >= self.batch:
            self._wake.set()

    def flush(self) -> None:
        with self._lock:
            records: list[RequestRecord] = []
            while self._buffer:
                records.append(self._buffer.popleft())
            try:
                self.store.add_requests(records)
            except Exception:
                self._buffer.extendleft(reversed(records))  # kept for the next try
                raise

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
            except Exception as exc:  # a database that is down: keep serving, try again
                log.warning("request log: %d records not written yet: %s", len(self._buffer), exc)
                self._stop.wait(1.0)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)
        try:
            self.flush()
        except Exception as exc:
            log.error("request log: %d records lost at shutdown: %s", len(self._buffer), exc)
