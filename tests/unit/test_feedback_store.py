"""The feedback store: score normalisation, one-line field errors, idempotence, the bounded and
durable request log. Rows are read back with plain sqlite3, not through the store."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoglm_core.feedback.records import FeedbackError, RequestRecord, normalise, parse_feedback
from autoglm_core.feedback.store import FeedbackStore, RequestLog


def record(
    i: int, *, revision: str = "r1", variant: str = "concise", at: float | None = None
) -> RequestRecord:
    return RequestRecord(
        f"req-{i}", time.time() if at is None else at, "m", revision, variant, "local", 0.1, 5, 7, 0.5,
        "cpu-time-model", "ok", prompt=f"prompt {i}", output=f"answer {i}",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("score", "kind", "expected"),
    [
        ("up", None, ("thumbs", 1.0)), ("down", None, ("thumbs", 0.0)), (True, None, ("thumbs", 1.0)),
        (1, "rating", ("rating", 0.0)), (5, "rating", ("rating", 1.0)), (3, "rating", ("rating", 0.5)),
        (0.3, None, ("number", 0.3)), (1, None, ("number", 1.0)), (0, "number", ("number", 0.0)),
    ],
)  # fmt: skip
def test_scores_are_normalised_to_the_unit_interval_with_their_kind(
    score: object, kind: str | None, expected: tuple
) -> None:
    assert normalise(score, kind) == expected  # type: ignore[arg-type]


@given(st.integers(1, 5))
def test_a_rating_maps_linearly_onto_zero_to_one(rating: int) -> None:
    assert normalise(rating, "rating")[1] == pytest.approx((rating - 1) / 4)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"request_id": "a", "score": 4}, "'score': a number score is in [0, 1], got 4; for a 1-5 rating say \"kind\": \"rating\""),
        ({"request_id": "a", "score": 6, "kind": "rating"}, "'score': a rating is an integer from 1 to 5, got 6"),
        ({"request_id": "a", "score": "meh"}, "'score': a thumbs score is \"up\", \"down\", true or false, got \"meh\""),
        ({"request_id": "a b", "score": "up"}, "'request_id' must be the x-request-id of a response"),
        ({"score": "up"}, "'request_id' is required"),
        ({"request_id": "a", "score": "up", "stars": 3}, "'stars' is not a feedback field (allowed: request_id,"),
        ({"feedback": []}, "'feedback' must be a list of 1 to 1000 events"),
        ({"feedback": [{"request_id": "a", "score": "up"}, 3]}, "feedback[1] must be a JSON object"),
        ([1], "the body must be a JSON object"),
    ],
)  # fmt: skip
def test_bad_feedback_is_refused_on_one_line_naming_the_field(body: object, message: str) -> None:
    with pytest.raises(FeedbackError) as caught:
        parse_feedback(body)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)
    assert caught.value.status == 400


def test_feedback_is_stored_once_per_request_and_source_and_joined_to_its_request(tmp_path: Path) -> None:
    db = tmp_path / "fb.db"
    store = FeedbackStore(f"sqlite:///{db}")
    store.add_requests(
        [record(1, revision="r1", variant="concise"), record(2, revision="r2", variant="detailed")]
    )
    results = store.accept(parse_feedback({"feedback": [
        {"request_id": "req-1", "score": "up"}, {"request_id": "req-1", "score": "down"},
        {"request_id": "req-1", "source": "reviewer", "score": 2, "kind": "rating"},
        {"request_id": "req-2", "score": 0.4}, {"request_id": "req-9", "score": 0.4},
    ]}))  # fmt: skip
    assert [r.status for r in results] == ["accepted", "duplicate", "accepted", "accepted", "unknown_request"]
    again = store.accept(parse_feedback({"request_id": "req-1", "score": "down"}))
    assert again[0].status == "duplicate"
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT request_id, source, score, revision, prompt_variant FROM autoglm_feedback"
        ).fetchall()
    assert sorted(rows) == [
        ("req-1", "reviewer", 0.25, "r1", "concise"), ("req-1", "user", 1.0, "r1", "concise"),
        ("req-2", "user", 0.4, "r2", "detailed"),
    ]  # fmt: skip


def test_concurrent_writers_of_the_same_event_store_it_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    FeedbackStore(url).add_requests([record(1)])
    statuses: list[str] = []

    def rate() -> None:
        statuses.extend(
            r.status for r in FeedbackStore(url).accept(parse_feedback({"request_id": "req-1", "score": 1.0}))
        )

    threads = [threading.Thread(target=rate) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == ["accepted"] + ["duplicate"] * 5
    assert FeedbackStore(url).count_feedback() == 1


def test_the_request_log_keeps_the_newest_records_and_survives_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    store = FeedbackStore(url, max_requests=50)
    log = RequestLog(store, flush_seconds=60)  # only flush() and close() write
    base = time.time()
    for i in range(120):
        log.record(record(i, at=base + i))
    log.close()  # a server's shutdown writes what is buffered
    reopened = FeedbackStore(url, max_requests=50)
    reopened.trim()
    with sqlite3.connect(tmp_path / "fb.db") as conn:
        kept = sorted(
            int(r[0].removeprefix("req-")) for r in conn.execute("SELECT request_id FROM autoglm_requests")
        )
    assert kept == list(range(70, 120))
    assert reopened.request("req-119").output == "answer 119"  # type: ignore[union-attr]
    assert reopened.accept(parse_feedback({"request_id": "req-119", "score": "up"}))[0].status == "accepted"
    assert (
        reopened.accept(parse_feedback({"request_id": "req-3", "score": "up"}))[0].status == "unknown_request"
    )


def test_a_request_log_whose_database_is_down_keeps_the_records_for_later(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    log = RequestLog(store, flush_seconds=60)
    real = store.add_requests
    store.add_requests = lambda records: (_ for _ in ()).throw(OSError("database is down"))  # type: ignore[method-assign]
    log.record(record(1))
    with pytest.raises(OSError, match="database is down"):
        log.flush()
    store.add_requests = real  # type: ignore[method-assign]
    log.close()
    assert store.request("req-1") is not None


def _postgres_url() -> str:
    import os

    from sqlalchemy import create_engine

    from autoglm_core.feedback.store import metadata

    url = os.environ.get("AUTOGLM_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("set AUTOGLM_TEST_POSTGRES_URL to run against PostgreSQL (CI does)")
    engine = create_engine(url)
    try:
        metadata.drop_all(engine)  # fresh feedback tables for this test
    finally:
        engine.dispose()
    return url


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_store_works_the_same_on_sqlite_and_postgresql(backend: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fb.db'}" if backend == "sqlite" else _postgres_url()
    store = FeedbackStore(url, max_requests=40)
    base = time.time()
    records = [record(i, revision="r1", variant=("a", "b")[i % 2], at=base + i) for i in range(50)]
    records[3] = RequestRecord(**{**records[3].__dict__, "status": "error"})
    store.add_requests(records)
    store.trim()
    assert store.count_requests() == 40
    events = [{"request_id": f"req-{i}", "score": i % 2 == 0} for i in range(10, 20)]
    results = store.accept(
        parse_feedback({"feedback": [*events, events[0], {"request_id": "req-0", "score": 1.0}]})
    )
    assert [r.status for r in results] == ["accepted"] * 10 + ["duplicate", "unknown_request"]
    assert store.feedback_totals("m") == {("r1", "a"): (5, 5.0), ("r1", "b"): (5, 0.0)}
    totals = store.request_totals("m")
    assert totals[("r1", "a")].requests + totals[("r1", "b")].requests == 40
    assert sum(t.errors for t in totals.values()) == 0  # req-3 was trimmed with the oldest
    spool = store.unpushed(limit=4)
    assert [f.request_id for f in spool] == ["req-10", "req-11", "req-12", "req-13"]
    store.mark_pushed([f.id for f in spool])
    assert store.count_feedback(pushed=False) == 6
    store.close()


def test_the_feedback_api_alone_refuses_a_body_over_its_limit_and_takes_a_batch(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from autoglm_inference.routes.feedback import feedback_app

    store = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    store.add_requests([record(1)])
    client = TestClient(feedback_app(store, None, max_body_bytes=2048), client=("127.0.0.1", 5000))
    too_big = client.post(
        "/v1/feedback", json={"request_id": "req-1", "score": "up", "correction": "x" * 4000}
    )
    assert too_big.status_code == 413
    assert "2048" in too_big.json()["error"]
    ok = client.post("/v1/feedback", json={"feedback": [{"request_id": "req-1", "score": "up"}]})
    assert ok.status_code == 200
    assert ok.json()["accepted"] == 1
    outsider = TestClient(feedback_app(store, None), client=("10.1.2.3", 5000))
    refused = outsider.post("/v1/feedback", json={"request_id": "req-1", "score": "down", "source": "x"})
    assert refused.status_code == 403
    assert "loopback" in refused.json()["error"]
