"""The ledger against a real SQLite file: appends, queries, and tampering done behind its back."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from autoglm_core.audit import (
    DEFAULT_URL,
    GATE_FAILED,
    GATE_PASSED,
    GENESIS_HASH,
    PROMOTED,
    URL_ENV,
    AuditRecord,
    Ledger,
    LedgerConflictError,
    LedgerCorruptError,
    LedgerUnavailableError,
    resolve_url,
)
from autoglm_core.audit.records import compute_hash, record_from_row
from autoglm_core.digests import canonical_json

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture
def ledger(db_path: Path) -> Iterator[Ledger]:
    with Ledger(f"sqlite:///{db_path}") as opened:
        yield opened


def fill(ledger: Ledger, count: int) -> list[AuditRecord]:
    return [
        ledger.append(
            "default",
            "glm-4",
            GATE_PASSED,
            f"gate {i} passed",
            evidence={"metrics": {"accuracy": 0.9}, "run": i},
            now=T0 + timedelta(minutes=i),
        )
        for i in range(1, count + 1)
    ]


def tamper(db_path: Path, *statements: str) -> None:
    """Change the file the way someone with sqlite3 and write access could."""
    with closing(sqlite3.connect(db_path)) as conn, conn:
        for statement in statements:
            conn.execute(statement)


def swap_contents(db_path: Path, a: int, b: int) -> None:
    """Put record ``b``'s contents at position ``a`` and the other way round."""
    with closing(sqlite3.connect(db_path)) as conn, conn:
        conn.row_factory = sqlite3.Row
        rows = {
            r["seq"]: dict(r) for r in conn.execute("SELECT * FROM audit_records WHERE seq IN (?, ?)", (a, b))
        }
        conn.execute("DELETE FROM audit_records WHERE seq IN (?, ?)", (a, b))
        for seq, source in ((a, b), (b, a)):
            row = {**rows[source], "seq": seq}
            conn.execute(
                f"INSERT INTO audit_records ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )


def raw_insert(db_path: Path, record: AuditRecord, **changes: object) -> None:
    """Insert a copy of ``record`` with ``changes`` straight into the table, bypassing the ledger."""
    row = {**record.to_json(), "evidence": canonical_json(record.evidence), **changes}
    with closing(sqlite3.connect(db_path)) as conn, conn:
        conn.execute(
            f"INSERT INTO audit_records ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            list(row.values()),
        )


def head_in_file(db_path: Path) -> tuple[int, str]:
    with closing(sqlite3.connect(db_path)) as conn:
        seq, digest = conn.execute("SELECT seq, hash FROM audit_head").fetchone()
        return seq, digest


class TestAppend:
    def test_records_form_a_chain_from_genesis(self, ledger: Ledger) -> None:
        records = fill(ledger, 3)
        assert [r.seq for r in records] == [1, 2, 3]
        assert records[0].prev_hash == GENESIS_HASH
        assert [r.prev_hash for r in records[1:]] == [r.hash for r in records[:-1]]
        assert all(compute_hash(r) == r.hash for r in records)
        assert len({r.id for r in records}) == 3

    def test_query_returns_exactly_what_was_appended(self, ledger: Ledger) -> None:
        appended = ledger.append(
            "default",
            "glm-4",
            PROMOTED,
            "canary healthy for 1h",
            revision="r7",
            actor="user:alice",
            evidence={
                "metrics": {"error_rate": 0.001},
                "queries": ["sum(rate(errors[5m]))"],
                "note": "ünïcode",
            },
        )
        assert ledger.query() == [appended]

    def test_time_defaults_to_now_in_utc(self, ledger: Ledger) -> None:
        before = datetime.now(UTC)
        record = ledger.append("default", "glm-4", GATE_PASSED, "ok")
        assert before <= record.time <= datetime.now(UTC)
        assert record.time.tzinfo is UTC

    def test_reopening_continues_the_chain(self, db_path: Path) -> None:
        with Ledger(f"sqlite:///{db_path}") as first:
            one = first.append("default", "glm-4", GATE_PASSED, "one")
        with Ledger(f"sqlite:///{db_path}") as second:
            two = second.append("default", "glm-4", PROMOTED, "two")
            assert (two.seq, two.prev_hash) == (2, one.hash)
            assert second.verify().ok

    def test_threads_share_one_ledger(self, ledger: Ledger) -> None:
        def work(worker: int) -> None:
            for i in range(25):
                ledger.append("default", "glm-4", GATE_PASSED, f"thread {worker} append {i}")

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(work, range(4)))
        assert [r.seq for r in ledger.query()] == list(range(1, 101))
        assert ledger.verify().ok

    def test_head_is_advanced_in_the_same_transaction(self, ledger: Ledger, db_path: Path) -> None:
        last = fill(ledger, 4)[-1]
        assert head_in_file(db_path) == (4, last.hash)

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"evidence": {"tags": {"a", "b"}}}, r"evidence\.tags is a set"),
            ({"evidence": [1, 2]}, "must be a JSON object"),
            ({"actor": "root"}, "'operator', 'pipeline' or 'user:<name>'"),
            ({"decision": "promoted"}, "CamelCase"),
            ({"reason": ""}, "reason must not be empty"),
            ({"now": datetime(2025, 1, 1)}, "no timezone"),  # naive on purpose
        ],
    )
    def test_bad_input_raises_and_stores_nothing(
        self, ledger: Ledger, kwargs: dict[str, object], message: str
    ) -> None:
        fill(ledger, 2)
        args: dict[str, object] = {"decision": GATE_PASSED, "reason": "why", **kwargs}
        with pytest.raises(ValueError, match=message):
            ledger.append("default", "glm-4", **args)  # type: ignore[arg-type]
        assert [r.seq for r in ledger.query()] == [1, 2]
        assert ledger.verify().ok

    def test_a_conflict_is_retried_then_given_up_without_losing_anything(
        self, ledger: Ledger, db_path: Path
    ) -> None:
        records = fill(ledger, 3)
        # A row at seq 4 that the head does not know about: every attempt collides with it.
        raw_insert(db_path, records[2], id="foreign", seq=4, prev_hash="e" * 64)
        with pytest.raises(LedgerConflictError, match="gave up after 5 attempts"):
            ledger.append("default", "glm-4", GATE_PASSED, "blocked")
        assert head_in_file(db_path) == (3, records[2].hash)
        assert [r.seq for r in ledger.query()] == [1, 2, 3, 4]

    def test_missing_head_stops_appends_and_is_not_recreated(self, ledger: Ledger, db_path: Path) -> None:
        fill(ledger, 2)
        tamper(db_path, "DELETE FROM audit_head")
        with pytest.raises(LedgerCorruptError, match="audit_head row is missing"):
            ledger.append("default", "glm-4", GATE_PASSED, "lost")
        with Ledger(f"sqlite:///{db_path}") as reopened:
            result = reopened.verify()
        assert not result.ok
        assert result.reason == "the audit_head row is missing: the head was deleted"


class TestSchema:
    def test_constraints_and_indexes(self, ledger: Ledger, db_path: Path) -> None:
        engine = create_engine(f"sqlite:///{db_path}")
        try:
            inspector = inspect(engine)
            uniques = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("audit_records")}
            indexes = {tuple(i["column_names"]) for i in inspector.get_indexes("audit_records")}
        finally:
            engine.dispose()
        assert {("seq",), ("prev_hash",)} <= uniques
        assert {("namespace", "model"), ("decision",), ("time",)} <= indexes

    def test_the_chain_cannot_fork_even_bypassing_the_ledger(self, ledger: Ledger, db_path: Path) -> None:
        records = fill(ledger, 2)
        with pytest.raises(sqlite3.IntegrityError, match=r"audit_records\.prev_hash"):
            raw_insert(db_path, records[1], id="second-child", seq=3)
        with pytest.raises(sqlite3.IntegrityError, match=r"audit_records\.seq"):
            raw_insert(db_path, records[1], id="same-position", prev_hash="f" * 64)

    def test_wal_journal(self, ledger: Ledger, db_path: Path) -> None:
        with closing(sqlite3.connect(db_path)) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


Tamper = Callable[[Path], None]


def _sql(*statements: str) -> Tamper:
    return lambda path: tamper(path, *statements)


TAMPERING = [
    pytest.param(
        _sql("UPDATE audit_records SET reason = 'all fine' WHERE seq = 3"),
        3,
        3,
        "hash mismatch: row altered",
        id="reason",
    ),
    pytest.param(
        _sql("""UPDATE audit_records SET evidence = '{"metrics":{"accuracy":0.99},"run":2}' WHERE seq = 2"""),
        2,
        2,
        "hash mismatch: row altered",
        id="evidence",
    ),
    pytest.param(
        _sql("DELETE FROM audit_records WHERE seq = 3"),
        4,
        4,
        "prev_hash does not match the previous record's hash: a record was deleted or reordered",
        id="middle-row-deleted",
    ),
    pytest.param(
        _sql("DELETE FROM audit_records WHERE seq = 5"),
        5,
        None,
        "head says 5 records but the newest is 4: records were deleted from the end",
        id="last-row-deleted",
    ),
    pytest.param(
        _sql("DELETE FROM audit_records WHERE seq >= 3"),
        3,
        None,
        "head says 5 records but the newest is 2: records were deleted from the end",
        id="last-rows-deleted",
    ),
    pytest.param(
        lambda path: swap_contents(path, 2, 3),
        2,
        3,
        "prev_hash does not match the previous record's hash: a record was deleted or reordered",
        id="rows-swapped",
    ),
    pytest.param(
        _sql(f"UPDATE audit_records SET hash = '{'a' * 64}' WHERE seq = 4"),
        4,
        4,
        "hash mismatch: row altered",
        id="hash",
    ),
    pytest.param(
        _sql("UPDATE audit_records SET time = '2020-01-01T00:00:00.000000Z' WHERE seq = 1"),
        1,
        1,
        "hash mismatch: row altered",
        id="time",
    ),
]


class TestVerify:
    def test_intact(self, ledger: Ledger) -> None:
        fill(ledger, 5)
        result = ledger.verify()
        assert (result.ok, result.checked) == (True, 5)

    def test_empty(self, ledger: Ledger) -> None:
        assert ledger.verify().ok

    @pytest.mark.parametrize(("change", "bad_seq", "bad_record", "reason"), TAMPERING)
    def test_tampering_is_caught_at_the_first_bad_record(
        self, ledger: Ledger, db_path: Path, change: Tamper, bad_seq: int, bad_record: int | None, reason: str
    ) -> None:
        records = fill(ledger, 5)
        assert ledger.verify().ok
        change(db_path)
        result = ledger.verify()
        assert not result.ok
        assert result.bad_seq == bad_seq
        assert result.bad_id == (records[bad_record - 1].id if bad_record is not None else None)
        assert result.reason is not None
        assert result.reason.startswith(reason)

    def test_reads_do_not_wait_for_a_writer(self, ledger: Ledger, db_path: Path) -> None:
        fill(ledger, 3)
        with closing(sqlite3.connect(db_path, isolation_level=None)) as writer:
            writer.execute("BEGIN IMMEDIATE")  # another process holding the write lock
            writer.execute("UPDATE audit_head SET seq = 99")
            assert ledger.verify().ok  # sees the last committed state
            assert len(ledger.query()) == 3
            writer.execute("ROLLBACK")

    def test_a_rewritten_record_with_a_fresh_hash_is_caught_at_the_next(
        self, ledger: Ledger, db_path: Path
    ) -> None:
        records = fill(ledger, 4)
        with closing(sqlite3.connect(db_path)) as conn, conn:
            conn.row_factory = sqlite3.Row
            row = dict(conn.execute("SELECT * FROM audit_records WHERE seq = 2").fetchone())
            forged = record_from_row({**row, "reason": "forged"})
            conn.execute(
                "UPDATE audit_records SET reason = 'forged', hash = ? WHERE seq = 2", (compute_hash(forged),)
            )
        result = ledger.verify()
        assert (result.bad_seq, result.bad_id) == (3, records[2].id)


class TestQuery:
    @pytest.fixture
    def varied(self, ledger: Ledger) -> list[AuditRecord]:
        return [
            ledger.append("default", "glm-4", GATE_PASSED, "a", revision="r1", now=T0),
            ledger.append("default", "glm-4", PROMOTED, "b", revision="r1", now=T0 + timedelta(hours=1)),
            ledger.append("team-b", "glm-4", GATE_PASSED, "c", revision="r2", now=T0 + timedelta(hours=2)),
            ledger.append("default", "other", GATE_FAILED, "d", now=T0 + timedelta(hours=3)),
        ]

    @pytest.mark.parametrize(
        ("filters", "expected"),
        [
            ({}, [1, 2, 3, 4]),
            ({"namespace": "default", "model": "glm-4"}, [1, 2]),
            ({"namespace": "default"}, [1, 2, 4]),
            ({"model": "glm-4"}, [1, 2, 3]),
            ({"decision": GATE_PASSED}, [1, 3]),
            ({"revision": "r1"}, [1, 2]),
            ({"since": T0 + timedelta(hours=1)}, [2, 3, 4]),
            ({"until": T0 + timedelta(hours=2)}, [1, 2]),
            ({"since": T0 + timedelta(minutes=30), "until": T0 + timedelta(minutes=90)}, [2]),
            ({"since": T0 + timedelta(hours=5)}, []),
            ({"limit": 2}, [3, 4]),
            ({"decision": GATE_PASSED, "limit": 1}, [3]),
            ({"limit": 10**30}, [1, 2, 3, 4]),
            ({"namespace": "default", "model": "glm-4", "decision": PROMOTED}, [2]),
        ],
    )
    def test_filters(
        self, ledger: Ledger, varied: list[AuditRecord], filters: dict[str, object], expected: list[int]
    ) -> None:
        assert [r.seq for r in ledger.query(**filters)] == expected  # type: ignore[arg-type]

    def test_since_accepts_any_timezone(self, ledger: Ledger, varied: list[AuditRecord]) -> None:
        tokyo = (T0 + timedelta(hours=2)).astimezone(timezone(timedelta(hours=9)))
        assert [r.seq for r in ledger.query(since=tokyo)] == [3, 4]

    @pytest.mark.parametrize(
        ("filters", "message"),
        [
            ({"decision": "promoted"}, "CamelCase"),
            ({"limit": 0}, "limit must be 1 or more"),
            ({"namespace": "A"}, "DNS"),
        ],
    )
    def test_bad_filters(self, ledger: Ledger, filters: dict[str, object], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            ledger.query(**filters)  # type: ignore[arg-type]


class TestUrls:
    def test_precedence(self) -> None:
        assert resolve_url(None, {}) == DEFAULT_URL == "sqlite:///.autoglm/audit.db"
        assert resolve_url(None, {URL_ENV: "sqlite:///env.db"}) == "sqlite:///env.db"
        assert resolve_url("sqlite:///flag.db", {URL_ENV: "sqlite:///env.db"}) == "sqlite:///flag.db"
        assert resolve_url(None, {URL_ENV: ""}) == DEFAULT_URL

    def test_default_url_creates_its_directory(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        with Ledger() as ledger:
            ledger.append("default", "glm-4", GATE_PASSED, "ok")
        assert (tmp_path / ".autoglm" / "audit.db").is_file()

    def test_in_memory_ledger(self) -> None:
        with Ledger("sqlite://") as ledger:
            fill(ledger, 3)
            assert ledger.verify().checked == 3

    @pytest.mark.parametrize(
        ("url", "message"),
        [
            ("not a url", "Could not parse"),
            ("mysql://db/audit", "database 'mysql' is not supported: use sqlite:///PATH or postgresql"),
            ("postgresql+psycopg://audit:secret@127.0.0.1:1/audit", r"audit:\*\*\*@127\.0\.0\.1:1"),
        ],
    )
    def test_unavailable_database(self, url: str, message: str) -> None:
        with pytest.raises(LedgerUnavailableError, match=message):
            Ledger(url)

    def test_unusable_sqlite_path(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("not a directory")
        with pytest.raises(LedgerUnavailableError, match="cannot open audit database"):
            Ledger(f"sqlite:///{tmp_path}/file/audit.db")


class TestIdempotency:
    def test_the_same_key_returns_the_existing_record_and_appends_nothing(self, ledger: Ledger) -> None:
        first = ledger.append(
            "default", "glm-4", GATE_PASSED, "all gates passed", revision="r1", idempotency_key="verdict/r1"
        )
        again = ledger.append(
            "default", "glm-4", GATE_PASSED, "all gates passed", revision="r1", idempotency_key="verdict/r1"
        )
        assert again == first
        assert [r.seq for r in ledger.query()] == [1]
        other = ledger.append("default", "glm-4", GATE_PASSED, "passed", idempotency_key="verdict/r2")
        unkeyed = [ledger.append("default", "glm-4", PROMOTED, "promoted") for _ in range(2)]
        assert [other.seq, *(r.seq for r in unkeyed)] == [2, 3, 4]
        assert [r.idempotency_key for r in ledger.query()] == ["verdict/r1", "verdict/r2", None, None]
        assert ledger.verify().ok

    def test_the_key_is_covered_by_the_hash(self, ledger: Ledger, db_path: Path) -> None:
        ledger.append("default", "glm-4", GATE_PASSED, "passed", idempotency_key="verdict/r1")
        tamper(db_path, "UPDATE audit_records SET idempotency_key = 'verdict/r9'")
        assert ledger.verify().reason == "hash mismatch: row altered"

    def test_threads_racing_with_one_key_record_it_once(self, ledger: Ledger) -> None:
        def append(_: int) -> AuditRecord:
            return ledger.append("default", "glm-4", GATE_PASSED, "passed", idempotency_key="verdict/r1")

        with ThreadPoolExecutor(4) as pool:
            records = list(pool.map(append, range(8)))
        assert len({r.id for r in records}) == 1
        assert len(ledger.query()) == 1

    def test_a_ledger_from_before_keys_is_upgraded_in_place(self, db_path: Path) -> None:
        with Ledger(f"sqlite:///{db_path}") as ledger:
            old = fill(ledger, 2)
        # The schema as it was before keys: no column, no index.
        tamper(
            db_path,
            "DROP INDEX uq_audit_records_idempotency_key",
            "ALTER TABLE audit_records DROP COLUMN idempotency_key",
        )
        with Ledger(f"sqlite:///{db_path}") as ledger:
            assert ledger.verify().ok  # old records hash as they did
            assert ledger.query() == old
            keyed = ledger.append("default", "glm-4", GATE_PASSED, "passed", idempotency_key="k")
            assert ledger.append("default", "glm-4", GATE_PASSED, "passed", idempotency_key="k") == keyed
            assert keyed.seq == 3
        with pytest.raises(sqlite3.IntegrityError, match="idempotency_key"):
            raw_insert(db_path, keyed, id="copy", seq=4, prev_hash=keyed.hash)

    @pytest.mark.parametrize("key", ["", "x" * 256, "a\x00b"])
    def test_bad_keys_are_refused(self, ledger: Ledger, key: str) -> None:
        with pytest.raises(ValueError, match="idempotency key must be 1-255 characters"):
            ledger.append("default", "glm-4", GATE_PASSED, "passed", idempotency_key=key)
        assert ledger.query() == []
