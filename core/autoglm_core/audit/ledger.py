"""The audit ledger's database gateway: the only code that reads or writes audit rows.

Records are built and checked by the pure functions in ``records.py``; this module adds the clock,
the record id and the transactions. One SQLAlchemy Core code path serves SQLite and PostgreSQL.

Concurrent appends are serialised by a lock taken *before* the head is read: ``BEGIN IMMEDIATE`` on
SQLite (the documented pysqlite recipe, so the driver does not defer BEGIN), ``SELECT ... FOR
UPDATE`` on the head row on PostgreSQL. The unique constraints on ``seq`` and ``prev_hash`` and the
conditional head update make a fork impossible even if that locking were wrong; such a conflict is
retried a bounded number of times.

An append may carry an idempotency key: under the same lock the ledger looks the key up first and
returns the record already holding it instead of appending (a unique index backs this up). Ledgers
created before the key existed get its column and index when first opened by this version.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    event,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.engine.interfaces import DBAPICursor
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from autoglm_core.audit.records import (
    ACTOR_OPERATOR,
    GENESIS_HASH,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    AuditRecord,
    ChainHead,
    RecordDraft,
    VerifyResult,
    chain_record,
    draft_record,
    format_time,
    record_from_row,
    record_to_row,
    validate_decision,
    validate_model,
    validate_namespace,
    verify_chain,
)

DEFAULT_URL: Final = "sqlite:///.autoglm/audit.db"
URL_ENV: Final = "AUTOGLM_AUDIT_URL"
#: Attempts at one append when a uniqueness conflict shows another writer got there first.
MAX_APPEND_ATTEMPTS: Final = 5
#: Seconds a SQLite writer waits for the lock before giving up.
SQLITE_BUSY_TIMEOUT_S: Final = 30
SQLITE_JOURNAL_MODE: Final = "WAL"
#: FULL: a committed audit record survives power loss, not only a crash of the process.
SQLITE_SYNCHRONOUS: Final = "FULL"
_HEAD_ID: Final = 1
_MAX_SQL_INTEGER: Final = 2**63 - 1
# Any fixed 64-bit number: serialises schema creation between PostgreSQL clients.
_PG_SCHEMA_LOCK_KEY: Final = 0x4155444954  # "AUDIT"
_BEGIN_MODE_OPTION: Final = "autoglm_sqlite_begin"
SUPPORTED_URLS: Final = "sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB"
_KEY_INDEX: Final = "uq_audit_records_idempotency_key"

metadata = MetaData()

audit_records = Table(
    "audit_records",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("time", String(32), nullable=False),
    Column("namespace", String(63), nullable=False),
    Column("model", String(253), nullable=False),
    Column("revision", String(255), nullable=True),
    Column("actor", String(258), nullable=False),
    Column("decision", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("evidence", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("idempotency_key", String(MAX_IDEMPOTENCY_KEY_LENGTH), nullable=True),
    # Two records can never claim the same position or the same predecessor: the chain cannot fork.
    UniqueConstraint("seq", name="uq_audit_records_seq"),
    UniqueConstraint("prev_hash", name="uq_audit_records_prev_hash"),
    Index("ix_audit_records_namespace_model", "namespace", "model"),
    Index("ix_audit_records_decision", "decision"),
    Index("ix_audit_records_time", "time"),
    # NULLs are distinct in a unique index on SQLite and PostgreSQL: only keyed records are constrained.
    Index(_KEY_INDEX, "idempotency_key", unique=True),
)

# Updated in the same transaction as each append, so deleting the newest records is detectable.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    CheckConstraint(f"id = {_HEAD_ID}", name="ck_audit_head_single_row"),
)

_SELECT_HEAD = select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == _HEAD_ID)
_LOCK_HEAD = _SELECT_HEAD.with_for_update()  # rendered on PostgreSQL; SQLite holds BEGIN IMMEDIATE
_ADVANCE_HEAD = (
    update(audit_head)
    .where(audit_head.c.id == _HEAD_ID, audit_head.c.seq == bindparam("old_seq"))
    .values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))
)
_FIND_KEY = select(audit_records).where(audit_records.c.idempotency_key == bindparam("key"))


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A Core statement compiled once for one dialect and run straight on the DBAPI cursor.

    An append runs three short statements; through ``Connection.execute`` SQLAlchemy's per-statement
    bookkeeping cost more than SQLite's own work (bench/ledger.py). Compiling the Core statements
    keeps one source of SQL for every dialect: paramstyle, casts and FOR UPDATE included.
    """

    sql: str
    positions: tuple[str, ...] | None  # parameter names in order, for positional paramstyles
    defaults: dict[str, Any]  # values bound in the statement itself, such as the head row's id

    @classmethod
    def compile(cls, statement: ClauseElement, dialect: Dialect) -> _Prepared:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        defaults = {
            name: value for name, value in compiled.params.items() if not compiled.binds[name].required
        }
        positions = tuple(compiled.positiontup or ()) if compiled.positional else None
        return cls(compiled.string, positions, defaults)

    def run(self, cursor: DBAPICursor, values: Mapping[str, Any]) -> None:
        params = {**self.defaults, **values}
        if self.positions is None:
            cursor.execute(self.sql, params)
        else:
            cursor.execute(self.sql, tuple(params[name] for name in self.positions))


@dataclass(frozen=True, slots=True)
class _AppendStatements:
    lock_head: _Prepared
    find_key: _Prepared
    insert_record: _Prepared
    advance_head: _Prepared

    @classmethod
    def compile(cls, dialect: Dialect) -> _AppendStatements:
        return cls(
            lock_head=_Prepared.compile(_LOCK_HEAD, dialect),
            find_key=_Prepared.compile(_FIND_KEY, dialect),
            insert_record=_Prepared.compile(audit_records.insert(), dialect),
            advance_head=_Prepared.compile(_ADVANCE_HEAD, dialect),
        )


class LedgerError(Exception):
    """Base of the ledger's errors; bad input raises ValueError instead."""


class LedgerUnavailableError(LedgerError):
    """The database cannot be reached or opened."""


class LedgerCorruptError(LedgerError):
    """The stored ledger is in a state appends cannot continue from; ``verify`` says more."""


class LedgerConflictError(LedgerError):
    """An append kept colliding with other rows and was given up; nothing was written."""


def resolve_url(explicit: str | None, environ: Mapping[str, str]) -> str:
    """The database URL: ``explicit`` if given, else ``$AUTOGLM_AUDIT_URL``, else ``DEFAULT_URL``."""
    return explicit or environ.get(URL_ENV) or DEFAULT_URL


def safe_url(url: str) -> str:
    """``url`` with any password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:
        return url


class Ledger:
    """An append-only, hash-chained audit log in a SQL database.

    ``Ledger("sqlite://")`` is an in-memory ledger for tests. Use as a context manager, or call
    ``close``. Raises LedgerUnavailableError when the database cannot be opened.
    """

    def __init__(self, url: str = DEFAULT_URL) -> None:
        self.url = url
        try:
            self._engine = _create_engine(make_url(url))
        except ImportError as exc:
            raise LedgerUnavailableError(
                f"cannot open audit database {safe_url(url)}: {exc}; for PostgreSQL install the "
                "'postgres' extra: pip install 'autoglm[postgres]'"
            ) from exc
        except (SQLAlchemyError, OSError) as exc:
            raise LedgerUnavailableError(
                f"cannot open audit database {safe_url(url)}: {_describe(exc)}"
            ) from exc
        dbapi = self._engine.dialect.loaded_dbapi
        self._io_errors: tuple[type[Exception], ...] = (DBAPIError, dbapi.Error, OSError)
        self._conflicts: tuple[type[Exception], ...] = (IntegrityError, dbapi.IntegrityError, _HeadMovedError)
        self._statements = _AppendStatements.compile(self._engine.dialect)
        # Appends reuse one connection, serialised by a lock: a pool checkout and checkin per append
        # was a tenth of an append's time on SQLite (bench/ledger.py).
        self._writer: Connection | None = None
        self._writer_lock = threading.Lock()
        try:
            with self._errors_translated("cannot open audit database"):
                self._ensure_schema()
        except BaseException:
            self._engine.dispose()
            raise

    def close(self) -> None:
        """Close the writer connection and every pooled one."""
        with self._writer_lock:
            self._drop_writer()
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def append(
        self,
        namespace: str,
        model: str,
        decision: str,
        reason: str,
        *,
        revision: str | None = None,
        actor: str = ACTOR_OPERATOR,
        evidence: object = None,
        now: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> AuditRecord:
        """Append one record in its own transaction and return it.

        With ``idempotency_key``, a record already holding that key is returned as it is and nothing
        is appended, whatever the other arguments say: a decision that must be recorded once (a
        pipeline's verdict on one revision) is keyed, and a retry or re-run cannot record it twice.

        Raises ValueError for bad input before touching the database, LedgerConflictError when
        the chain head kept moving, LedgerCorruptError when the head row is missing. A failed
        append rolls back whole: nothing stored before it is changed.
        """
        # Validate everything, evidence included, before taking the write lock.
        draft = draft_record(
            namespace=namespace,
            model=model,
            decision=decision,
            reason=reason,
            revision=revision,
            actor=actor,
            evidence=evidence,
            idempotency_key=idempotency_key,
        )
        if now is not None:
            format_time(now)
        record_id = uuid.uuid4().hex
        last_conflict: Exception | None = None
        with self._writer_lock, self._errors_translated():
            for _ in range(MAX_APPEND_ATTEMPTS):
                conn = self._writer_connection()
                try:
                    with conn.begin():  # BEGIN IMMEDIATE on SQLite
                        return self._append_locked(conn, draft, record_id, now)
                except self._conflicts as exc:
                    last_conflict = exc
                except BaseException:
                    self._drop_writer()  # it may be broken: the next append starts on a fresh one
                    raise
        raise LedgerConflictError(
            f"append gave up after {MAX_APPEND_ATTEMPTS} attempts on a conflict "
            f"({_describe(last_conflict)}); if no other writer is running, the tables were changed outside "
            "the ledger: run 'autoglm audit verify'"
        )

    def _writer_connection(self) -> Connection:
        if self._writer is None or self._writer.closed or self._writer.invalidated:
            self._writer = self._engine.connect()
        return self._writer

    def _drop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with suppress(SQLAlchemyError):
                writer.close()

    def _append_locked(
        self, conn: Connection, draft: RecordDraft, record_id: str, now: datetime | None
    ) -> AuditRecord:
        """Read the head under the write lock, insert the record after it and advance the head."""
        cursor = conn.connection.cursor()
        try:
            self._statements.lock_head.run(cursor, {})
            head = cursor.fetchone()
            if head is None:
                raise LedgerCorruptError(
                    "the audit_head row is missing, so the chain position is unknown: "
                    "run 'autoglm audit verify'"
                )
            head_seq, head_hash = head
            if draft.idempotency_key is not None:
                self._statements.find_key.run(cursor, {"key": draft.idempotency_key})
                existing = cursor.fetchone()
                if existing is not None:
                    return _readable(dict(zip(audit_records.columns.keys(), existing, strict=True)))
            record = chain_record(
                draft,
                record_id=record_id,
                seq=head_seq + 1,
                prev_hash=head_hash,
                # The clock is read under the lock, so on one host times follow seq.
                now=now or datetime.now(UTC),
            )
            self._statements.insert_record.run(cursor, record_to_row(record))
            self._statements.advance_head.run(
                cursor, {"old_seq": head_seq, "new_seq": record.seq, "new_hash": record.hash}
            )
            if cursor.rowcount != 1:
                raise _HeadMovedError(f"the head moved past seq {head_seq}")
        finally:
            cursor.close()
        return record

    def query(
        self,
        namespace: str | None = None,
        model: str | None = None,
        decision: str | None = None,
        revision: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[AuditRecord]:
        """Records matching every given filter, in seq order.

        ``since`` is inclusive and ``until`` exclusive. ``limit`` keeps the newest matches.
        """
        stmt = _filtered(namespace, model, decision, revision, since, until)
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be 1 or more, got {limit}")
            # Beyond the largest SQL integer "the newest N" is every record anyway.
            stmt = stmt.order_by(audit_records.c.seq.desc()).limit(min(limit, _MAX_SQL_INTEGER))
        else:
            stmt = stmt.order_by(audit_records.c.seq)
        with self._errors_translated(), self._snapshot() as conn:
            rows = conn.execute(stmt).all()
        records = [_readable(row._asdict()) for row in rows]
        return sorted(records, key=lambda r: r.seq) if limit is not None else records

    def verify(self) -> VerifyResult:
        """Check the whole chain and the head in one consistent snapshot; see ``verify_chain``."""
        with self._errors_translated(), self._snapshot() as conn:
            head_row = conn.execute(_SELECT_HEAD).first()
            head = None if head_row is None else ChainHead(seq=head_row.seq, hash=head_row.hash)
            rows = conn.execute(
                select(audit_records).order_by(audit_records.c.seq).execution_options(yield_per=1000)
            )
            return verify_chain((row._asdict() for row in rows), head)

    def _ensure_schema(self) -> None:
        with self._snapshot() as conn:
            names = set(inspect(conn).get_table_names())
            if (
                {audit_records.name, audit_head.name} <= names
                and conn.execute(_SELECT_HEAD).first()
                and _has_key_column(conn)
            ):
                return
        with self._engine.begin() as conn:  # BEGIN IMMEDIATE on SQLite: one process upgrades at a time
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_SCHEMA_LOCK_KEY})
            if audit_records.name in inspect(conn).get_table_names() and not _has_key_column(conn):
                _add_key_column(conn)
            metadata.create_all(conn, checkfirst=True)
            # A missing head beside existing records is tampering for verify to report, not to paper over.
            empty = conn.execute(select(audit_records.c.seq).limit(1)).first() is None
            if empty and conn.execute(_SELECT_HEAD).first() is None:
                conn.execute(audit_head.insert().values(id=_HEAD_ID, seq=0, hash=GENESIS_HASH))

    @contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        """A read transaction that sees one consistent state of both tables and blocks no writer."""
        with self._engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.execution_options(**{_BEGIN_MODE_OPTION: "DEFERRED"})  # WAL: a snapshot from first read
            elif conn.dialect.name == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    @contextmanager
    def _errors_translated(self, what: str = "error in audit database") -> Iterator[None]:
        """Driver and OS errors as LedgerUnavailableError; uniqueness conflicts pass through for retry."""
        try:
            yield
        except self._io_errors as exc:
            if isinstance(exc, self._conflicts):
                raise
            raise LedgerUnavailableError(f"{what} {safe_url(self.url)}: {_describe(exc)}") from exc


def _has_key_column(conn: Connection) -> bool:
    columns = inspect(conn).get_columns(audit_records.name)
    return any(c["name"] == audit_records.c.idempotency_key.name for c in columns)


def _add_key_column(conn: Connection) -> None:
    """Upgrade a ledger made before idempotency keys: a nullable column (old rows keep NULL) and its index.

    Both statements are plain SQL that SQLite and PostgreSQL run alike, inside the caller's locked
    transaction; old records hash exactly as before, since a NULL key is not part of the hash.
    """
    column = audit_records.c.idempotency_key
    column_type = column.type.compile(dialect=conn.dialect)
    conn.execute(text(f"ALTER TABLE {audit_records.name} ADD COLUMN {column.name} {column_type}"))
    conn.execute(
        text(f"CREATE UNIQUE INDEX IF NOT EXISTS {_KEY_INDEX} ON {audit_records.name} ({column.name})")
    )


class _HeadMovedError(Exception):
    """The conditional head update matched no row: another writer advanced the head."""


def _create_engine(url: URL) -> Engine:
    backend = url.get_backend_name()
    if backend == "sqlite":
        database = url.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if backend == "postgresql":
        connect_args = {"connect_timeout": 10} if url.get_driver_name().startswith("psycopg") else {}
        return create_engine(url, connect_args=connect_args)
    raise LedgerUnavailableError(f"database {backend!r} is not supported: use {SUPPORTED_URLS}")


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # The pysqlite recipe: stop the driver from issuing (deferred) BEGIN itself, so ours is used.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        _set_journal_mode(cursor)
        cursor.execute(f"PRAGMA synchronous={SQLITE_SYNCHRONOUS}")
    finally:
        cursor.close()


def _set_journal_mode(cursor: Any) -> None:
    """Switch to WAL once per database file, retrying while another process holds the lock.

    Changing the journal mode needs an exclusive lock and SQLite may answer "database is locked" at
    once instead of waiting out the busy timeout: several processes opening a new ledger together
    (the 4-process test, or operator replicas starting at once) hit that.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != SQLITE_JOURNAL_MODE.lower():
                cursor.execute(f"PRAGMA journal_mode={SQLITE_JOURNAL_MODE}")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _sqlite_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock before the head is read, so two writers cannot read the same head.
    mode = conn.get_execution_options().get(_BEGIN_MODE_OPTION, "IMMEDIATE")
    cursor = conn.connection.cursor()  # straight to the driver: this runs once per transaction
    try:
        cursor.execute(f"BEGIN {mode}")
    finally:
        cursor.close()


def _filtered(
    namespace: str | None,
    model: str | None,
    decision: str | None,
    revision: str | None,
    since: datetime | None,
    until: datetime | None,
) -> Select[Any]:
    stmt = select(audit_records)
    c = audit_records.c
    if namespace is not None:
        stmt = stmt.where(c.namespace == validate_namespace(namespace))
    if model is not None:
        stmt = stmt.where(c.model == validate_model(model))
    if decision is not None:
        stmt = stmt.where(c.decision == validate_decision(decision))
    if revision is not None:
        stmt = stmt.where(c.revision == revision)
    # Times are stored as fixed-width UTC text, so text comparison is time comparison.
    if since is not None:
        stmt = stmt.where(c.time >= format_time(since))
    if until is not None:
        stmt = stmt.where(c.time < format_time(until))
    return stmt


def _readable(row: Mapping[str, Any]) -> AuditRecord:
    try:
        return record_from_row(row)
    except (KeyError, ValueError) as exc:
        raise LedgerCorruptError(
            f"audit record seq {row.get('seq')} (id {row.get('id')}) is unreadable ({exc}): "
            "run 'autoglm audit verify'"
        ) from exc


def _describe(exc: BaseException | None) -> str:
    """The first line of the driver's own message, without SQLAlchemy's boilerplate."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig
    message = str(exc).strip().splitlines()
    return message[0] if message else type(exc).__name__
