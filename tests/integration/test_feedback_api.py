"""POST /v1/feedback on a real `autoglm serve`: users rate answers by their x-request-id.

Checked against what the server said when it answered (its response headers), against the store's
rows read with plain SQL, and against the server's /metrics parsed by prometheus_client.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from autoglm_inference.process import ServerProcess
from autoglm_operator.metrics import figures, parse
from tests.support.tiny_models import tiny_glm, with_model_card

pytestmark = pytest.mark.integration

TOKEN = "feedback-writer-secret"


def _serve(tmp_path: Path, db: Path, log: str) -> ServerProcess:
    """A server logging to ``db`` (a restart reopening it: ``tests/unit/test_feedback_store.py``)."""
    token = tmp_path / "feedback.token"
    token.write_text(TOKEN + "\n")
    return ServerProcess(
        "fb", str(tmp_path / "model"), "--feedback-url", f"sqlite:///{db}", "--feedback-token-file", str(token),
        "--target", "edge", log=tmp_path / log, model_roots=[tmp_path],
    ).wait_ready()  # fmt: skip


def _ask(server: ServerProcess, prompt: str) -> httpx.Response:
    response = httpx.post(
        f"{server.url}/openai/v1/completions",
        json={"model": "fb", "prompt": prompt, "max_tokens": 4},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response


def _scores(server: ServerProcess) -> dict[tuple[str, str], tuple[float, float]]:
    """(revision, variant) -> (count, sum) of autoglm_feedback_score, read with prometheus_client."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for s in family.samples:
            if s.name in ("autoglm_feedback_score_count", "autoglm_feedback_score_sum"):
                key = (s.labels["revision"], s.labels["prompt_variant"])
                count, total = out.get(key, (0.0, 0.0))
                out[key] = (s.value, total) if s.name.endswith("_count") else (count, s.value)
                assert s.labels["model"] == "fb"
                assert s.labels["target"] == "edge"
    return out


def test_feedback_is_joined_to_the_answer_it_rates_and_feeds_the_canary_metric(tmp_path: Path) -> None:
    tiny_glm(tmp_path / "model", init_std=0.3, seed=3)
    revision = "rev-fb"
    with_model_card(tmp_path / "model", revision)
    db = tmp_path / "feedback.db"
    server = _serve(tmp_path, db, "server.log")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        first, second = _ask(server, "To be, or not"), _ask(server, "The king")
        rid = first.headers["x-request-id"]
        assert first.headers["x-autoglm-revision"] == revision
        post = lambda body, headers=auth: httpx.post(f"{server.url}/v1/feedback", json=body, headers=headers)  # noqa: E731

        refused = post({"request_id": rid, "score": "up"}, {})
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "Bearer" in refused.json()["error"]
        assert post({"request_id": rid, "score": "up"}, {"Authorization": "Bearer wrong"}).status_code == 403

        accepted = post(
            {"request_id": rid, "score": "up", "correction": "To be or not to be", "labels": {"app": "t"}}
        )
        assert accepted.status_code == 200, accepted.text
        assert accepted.json() == {
            "request_id": rid, "source": "user", "status": "accepted", "score": 1.0, "kind": "thumbs",
            "revision": revision, "prompt_variant": "none",
        }  # fmt: skip
        again = post({"request_id": rid, "score": "down"})  # the same (request, source): the first stays
        assert again.status_code == 200
        assert again.json()["status"] == "duplicate"
        reviewer = post({"request_id": rid, "source": "reviewer", "score": 4, "kind": "rating"})
        assert reviewer.json()["score"] == 0.75

        unknown = post({"request_id": "never-answered", "score": 0.5})
        assert unknown.status_code == 404
        assert "never-answered" in unknown.json()["error"]
        bad = post({"request_id": rid, "score": 7})
        assert bad.status_code == 400
        assert bad.json()["error"] == "'score': a number score is in [0, 1], got 7"
        assert "\n" not in bad.json()["error"]

        batch = post({"feedback": [
            {"request_id": second.headers["x-request-id"], "score": 0.25},
            {"request_id": rid, "score": "up"},
            {"request_id": "gone", "score": "down"},
        ]})  # fmt: skip
        assert batch.status_code == 200
        assert [r["status"] for r in batch.json()["results"]] == ["accepted", "duplicate", "unknown_request"]
        assert (batch.json()["accepted"], batch.json()["duplicate"], batch.json()["unknown_request"]) == (
            1,
            1,
            1,
        )
        bad_batch = post({"feedback": [{"request_id": rid, "score": "up"}, {"request_id": rid}]})
        assert bad_batch.status_code == 400
        assert bad_batch.json()["error"] == "feedback[1]: 'score' is required"

        # The canary's metric: three accepted scores, 1 + 0.75 + 0.25, all on this revision.
        assert _scores(server) == {(revision, "none"): (3.0, 2.0)}
        assert figures(
            parse(httpx.get(f"{server.url}/metrics").text), None, "fb", revision
        ).feedback_score == (pytest.approx(2.0 / 3.0))
    finally:
        server.stop()

    # What the store holds, read with plain SQL: each event once, joined to the request's revision.
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT request_id, source, kind, score, correction, revision, target FROM autoglm_feedback ORDER BY id"
        ).fetchall()
        logged = dict(conn.execute("SELECT request_id, prompt FROM autoglm_requests").fetchall())
    assert rows == [
        (rid, "user", "thumbs", 1.0, "To be or not to be", revision, "edge"),
        (rid, "reviewer", "rating", 0.75, None, revision, "edge"),
        (second.headers["x-request-id"], "user", "number", 0.25, None, revision, "edge"),
    ]
    assert logged[rid] == "To be, or not"
