"""Appends per second of the audit ledger against plain sqlite3 inserts of the same rows.

The ledger does one transaction per record: take the write lock, read the head, hash, insert, advance
the head, commit. The baseline is what the cheapest honest log would do with the stdlib: one INSERT
and one commit per row, into a table of the same shape (same DDL, constraints and indexes), with the
same journal mode and synchronous setting. Both run in one process, one after the other, in a temp
dir, for a few rounds. Usage: ``python bench/ledger.py [-n 2000] [-r 3]``.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine

from autoglm_core.audit.ledger import (
    SQLITE_JOURNAL_MODE,
    SQLITE_SYNCHRONOUS,
    Ledger,
    audit_records,
    metadata,
)
from autoglm_core.audit.records import GATE_PASSED, AuditRecord, record_to_row

TARGET_RATIO = 0.5


def _evidence(i: int) -> dict[str, object]:
    # The size and shape of a typical gate decision: metrics, thresholds and the query behind them.
    return {
        "metrics": {"accuracy": 0.912 + i * 1e-6, "p95_latency_ms": 184.5, "error_rate": 0.0031},
        "thresholds": {"accuracy": 0.9, "p95_latency_ms": 250, "error_rate": 0.01},
        "queries": {
            "error_rate": 'sum(rate(http_requests_total{code=~"5.."}[5m])) / sum(rate(http_requests_total[5m]))'
        },
    }


def bench_ledger(path: Path, count: int) -> tuple[float, list[AuditRecord]]:
    """Appends per second through Ledger.append, and the records it wrote."""
    with Ledger(f"sqlite:///{path}") as ledger:
        started = time.perf_counter()
        records = [
            ledger.append(
                "default",
                "glm-4-9b",
                GATE_PASSED,
                f"gate accuracy passed, run {i}",
                revision="r7",
                actor="pipeline",
                evidence=_evidence(i),
            )
            for i in range(count)
        ]
        elapsed = time.perf_counter() - started
        if not ledger.verify().ok:
            raise SystemExit("ledger bench: the chain did not verify")
    return count / elapsed, records


def bench_plain(path: Path, records: list[AuditRecord]) -> tuple[float, str, str]:
    """Inserts per second with stdlib sqlite3, and the journal mode and synchronous setting in force."""
    engine = create_engine(f"sqlite:///{path}")
    metadata.create_all(engine, tables=[audit_records])  # the ledger's own DDL: same table shape
    engine.dispose()
    rows = [record_to_row(r) for r in records]
    columns = list(rows[0])
    sql = f"INSERT INTO audit_records ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})"
    conn = sqlite3.connect(path, timeout=30)
    try:
        journal = conn.execute(f"PRAGMA journal_mode={SQLITE_JOURNAL_MODE}").fetchone()[0]
        conn.execute(f"PRAGMA synchronous={SQLITE_SYNCHRONOUS}")
        synchronous = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[
            conn.execute("PRAGMA synchronous").fetchone()[0]
        ]
        started = time.perf_counter()
        for row in rows:
            conn.execute(sql, row)
            conn.commit()
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    return len(rows) / elapsed, journal.upper(), synchronous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--count", type=int, default=2000, help="records per round (default 2000)")
    parser.add_argument("-r", "--rounds", type=int, default=3, help="rounds, medians reported (default 3)")
    args = parser.parse_args()
    if args.count < 1 or args.rounds < 1:
        parser.error("--count and --rounds must be 1 or more")
    ledger_rates, plain_rates = [], []
    with tempfile.TemporaryDirectory(prefix="autoglm-ledger-bench-") as tmp:
        for i in range(args.rounds):  # fresh files each round; fsync times vary, so take medians
            ledger_rate, records = bench_ledger(Path(tmp) / f"ledger-{i}.db", args.count)
            plain_rate, journal, synchronous = bench_plain(Path(tmp) / f"plain-{i}.db", records)
            ledger_rates.append(ledger_rate)
            plain_rates.append(plain_rate)
    if (journal, synchronous) != (SQLITE_JOURNAL_MODE, SQLITE_SYNCHRONOUS):
        raise SystemExit(
            f"baseline ran with journal_mode={journal} synchronous={synchronous}, not the ledger's"
        )
    ledger_rate, plain_rate = statistics.median(ledger_rates), statistics.median(plain_rates)
    ratio = ledger_rate / plain_rate
    print(f"audit ledger bench: {args.rounds} rounds x {args.count} records, median appends per second")
    print(f"  SQLite journal_mode={journal} synchronous={synchronous} for both (the ledger's settings)")
    print(
        f"  ledger (Ledger.append, one transaction per record): {ledger_rate:8.0f}/s  {_spread(ledger_rates)}"
    )
    print(
        f"  plain  (sqlite3 INSERT + commit per row)          : {plain_rate:8.0f}/s  {_spread(plain_rates)}"
    )
    verdict = "meets" if ratio >= TARGET_RATIO else "misses"
    print(f"  ratio ledger/plain: {ratio:.2f} ({verdict} the target of {TARGET_RATIO})")


def _spread(rates: list[float]) -> str:
    return f"(rounds: {', '.join(f'{r:.0f}' for r in rates)})"


if __name__ == "__main__":
    main()
