"""Several processes appending at once: no fork, no lost record, a chain that verifies.

SQLite always runs. PostgreSQL runs too when ``AUTOGLM_TEST_POSTGRES_URL`` names a database the test
may wipe, e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432/autoglm_test``.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from autoglm_core.audit import GATE_PASSED, Ledger
from autoglm_core.audit.ledger import metadata

pytestmark = pytest.mark.integration

WORKERS = 4
APPENDS_PER_WORKER = 250
POSTGRES_URL_ENV = "AUTOGLM_TEST_POSTGRES_URL"


def append_many(url: str, worker: int, start: Barrier) -> None:
    """One process: open its own ledger once all are ready, then append as fast as it can."""
    start.wait()
    with Ledger(url) as ledger:
        for i in range(APPENDS_PER_WORKER):
            ledger.append(
                "default",
                "glm-4",
                GATE_PASSED,
                f"worker {worker} append {i}",
                actor="pipeline",
                evidence={"worker": worker, "i": i},
            )


def _postgres_url() -> str:
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"set {POSTGRES_URL_ENV} to run against PostgreSQL")
    engine = create_engine(url)
    try:
        metadata.drop_all(engine)  # a fresh ledger for this run
    finally:
        engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    return _postgres_url()


def test_concurrent_appends_never_fork_nor_lose_a_record(url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(WORKERS)
    processes = [ctx.Process(target=append_many, args=(url, w, start)) for w in range(WORKERS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
    assert [p.exitcode for p in processes] == [0] * WORKERS

    with Ledger(url) as ledger:
        records = ledger.query()
        result = ledger.verify()
    total = WORKERS * APPENDS_PER_WORKER
    assert len(records) == total
    assert [r.seq for r in records] == list(range(1, total + 1))
    assert result.ok, result.describe()
    assert result.checked == total
    written = Counter((r.evidence["worker"], r.evidence["i"]) for r in records)
    assert written == Counter({(w, i): 1 for w in range(WORKERS) for i in range(APPENDS_PER_WORKER)})


def open_ledger(url: str, start: Barrier) -> None:
    start.wait()
    Ledger(url).close()


@pytest.mark.parametrize("attempt", range(5))
def test_many_processes_opening_a_new_ledger_at_once_all_succeed(tmp_path: Path, attempt: int) -> None:
    """Regression: switching a new file to WAL from several processes answered "database is locked"."""
    url = f"sqlite:///{tmp_path / f'new-{attempt}.db'}"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(6)
    processes = [ctx.Process(target=open_ledger, args=(url, start)) for _ in range(6)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * 6
    with Ledger(url) as ledger:
        assert ledger.verify().ok


def append_keyed(url: str, start: Barrier) -> None:
    start.wait()
    with Ledger(url) as ledger:
        ledger.append("default", "glm-4", GATE_PASSED, "all gates passed", idempotency_key="verdict/r1")


def test_processes_opening_an_old_ledger_upgrade_it_once_and_record_a_keyed_verdict_once(url: str) -> None:
    with Ledger(url) as ledger:
        old = [ledger.append("default", "glm-4", GATE_PASSED, f"old {i}") for i in range(3)]
    engine = create_engine(url)
    try:
        with engine.begin() as conn:  # back to the schema from before idempotency keys
            conn.execute(text("DROP INDEX uq_audit_records_idempotency_key"))
            conn.execute(text("ALTER TABLE audit_records DROP COLUMN idempotency_key"))
    finally:
        engine.dispose()
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(WORKERS)
    processes = [ctx.Process(target=append_keyed, args=(url, start)) for _ in range(WORKERS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * WORKERS
    with Ledger(url) as ledger:
        records = ledger.query()
        assert ledger.verify().ok
    assert records[:3] == old
    assert [(r.seq, r.idempotency_key) for r in records[3:]] == [(4, "verdict/r1")]
