"""The Feast feature repository fed by the micro-batch pipeline, on Feast's real local provider
(SQLite online store, parquet offline store): online features equal the aggregates pandas computes
from the store's rows, and a pipeline killed between its push and its mark loses and doubles nothing."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autoglm_core.feedback.records import RequestRecord, parse_feedback
from autoglm_core.feedback.store import FeedbackStore
from autoglm_feedback.features import FeaturePipeline, close_features, online_stats, open_features

pytestmark = pytest.mark.integration


def _fill(store: FeedbackStore, n: int, seed: int = 0, *, start: int = 0) -> None:
    rng = np.random.default_rng(seed)
    now = time.time()
    records = [
        RequestRecord(
            f"q{i}",
            now + i * 1e-3,
            "m",
            str(rng.choice(["r1", "r2"])),
            str(rng.choice(["concise", "detailed"])),
            "local",
            float(rng.uniform(0.05, 2.0)),
            int(rng.integers(4, 40)),
            int(rng.integers(1, 30)),
            float(rng.uniform(0.1, 3.0)),
            "cpu-time-model",
            str(rng.choice(["ok", "ok", "ok", "error"])),
            prompt="to be or not to be",
            output="x",
        )
        for i in range(start, start + n)
    ]
    store.add_requests(records)
    events = [
        {"request_id": r.request_id, "score": float(rng.random())} for r in records if rng.random() < 0.7
    ]
    store.accept(parse_feedback({"feedback": events}))


def _oracle(db: Path) -> pd.DataFrame:
    """Mean score, count, error rate and joules per token per (revision, variant), with plain SQL + pandas."""
    with sqlite3.connect(db) as conn:
        fb = pd.read_sql("SELECT revision, prompt_variant, score FROM autoglm_feedback", conn)
        rq = pd.read_sql(
            "SELECT revision, prompt_variant, status, joules, completion_tokens FROM autoglm_requests", conn
        )
    scores = fb.groupby(["revision", "prompt_variant"])["score"].agg(["mean", "count"])
    rq["error"] = rq["status"] == "error"
    served = rq.groupby(["revision", "prompt_variant"]).agg(
        errors=("error", "mean"),
        joules=("joules", "sum"),
        tokens=("completion_tokens", "sum"),
        n=("status", "size"),
    )
    served["jpt"] = served["joules"] / served["tokens"]
    return scores.join(served)


def _check_online(data: Path, db: Path, online_store: str = "sqlite") -> None:
    features = open_features(data, online_store)
    oracle = _oracle(db)
    try:
        got = online_stats(features, [("m", rev, var) for rev, var in oracle.index])
    finally:
        close_features(features)
    for (rev, var), row in oracle.iterrows():
        online = got[("m", rev, var)]
        assert online["feedback_count"] == row["count"]
        assert online["feedback_score"] == pytest.approx(row["mean"])
        assert online["requests"] == row["n"]
        assert online["error_rate"] == pytest.approx(row["errors"])
        assert online["joules_per_token"] == pytest.approx(row["jpt"])


def test_online_features_are_the_stores_aggregates(tmp_path: Path) -> None:
    db, data = tmp_path / "fb.db", tmp_path / "feast"
    store = FeedbackStore(f"sqlite:///{db}")
    _fill(store, 400)
    pipeline = FeaturePipeline(store, open_features(data), data, batch=100)
    assert pipeline.run_until_empty() == store.count_feedback()
    assert store.count_feedback(pushed=False) == 0
    _check_online(data, db)
    _fill(store, 200, seed=1, start=400)  # a second micro-batch updates the same keys
    pipeline.run_until_empty()
    _check_online(data, db)
    offline = pd.read_parquet(data / "feedback_stats.parquet")  # pushed online and offline
    assert set(offline["model_revision"]) == {"m@r1", "m@r2"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _online_store(kind: str, tmp_path: Path) -> Iterator[str]:
    """A cluster's online store: CI's PostgreSQL (``.ci/postgres.sh``), or a Redis server started
    here (Debian's redis-server, which ``.ci/run`` installs). Skipped without one, failed in CI."""
    missing = pytest.fail if os.environ.get("CI") else pytest.skip
    if kind == "postgres":
        url = os.environ.get("AUTOGLM_TEST_POSTGRES_URL")
        if not url:
            missing("set AUTOGLM_TEST_POSTGRES_URL (bash .ci/postgres.sh start prints one; CI does)")
        yield str(url).replace("postgresql+psycopg://", "postgresql://")
        return
    exe = shutil.which("redis-server")
    if exe is None:
        missing("no redis-server (apt-get install redis-server; .ci/run does)")
    port = _free_port()
    server = subprocess.Popen(
        [str(exe), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_a_clusters_online_store_is_one_setting_and_holds_the_same_features(
    kind: str, tmp_path: Path
) -> None:
    """``--online-store postgresql://...`` or ``redis://...``: the same pipeline, the same features."""
    db, data = tmp_path / "fb.db", tmp_path / "feast"
    store = FeedbackStore(f"sqlite:///{db}")
    _fill(store, 300, seed=3)
    with _online_store(kind, tmp_path) as online:
        pipeline = FeaturePipeline(store, open_features(data, online), data, batch=100)
        try:
            assert pipeline.run_until_empty() == store.count_feedback()
            _check_online(data, db, online)
            _fill(store, 100, seed=4, start=300)
            pipeline.run_until_empty()
            _check_online(data, db, online)
        finally:
            close_features(pipeline.features)
    # nothing of it went to the local SQLite online store
    assert not (data / "online.db").exists()


KILLED_AFTER_PUSH = """
import sys, time
from pathlib import Path
from autoglm_core.feedback.store import FeedbackStore
from autoglm_feedback.features import FeaturePipeline, open_features
data = Path(sys.argv[2])
features = open_features(data)
push = features.push
def push_then_hang(*args, **kwargs):
    push(*args, **kwargs)
    Path(sys.argv[3]).write_text("pushed")
    time.sleep(600)  # killed here: pushed, not marked
features.push = push_then_hang
FeaturePipeline(FeedbackStore(sys.argv[1]), features, data, batch=100).step()
"""


def test_a_pipeline_killed_mid_batch_loses_nothing_and_counts_nothing_twice(tmp_path: Path) -> None:
    db, data, marker = tmp_path / "fb.db", tmp_path / "feast", tmp_path / "pushed"
    store = FeedbackStore(f"sqlite:///{db}")
    _fill(store, 300)
    before = store.count_feedback()
    child = subprocess.Popen([sys.executable, "-c", KILLED_AFTER_PUSH, store.url, str(data), str(marker)])
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, "the pipeline exited before its push"
        assert time.monotonic() < deadline, "the pipeline did not reach its push"
        time.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert store.count_feedback(pushed=False) == before  # nothing marked: the spool holds all of it
    FeaturePipeline(store, open_features(data), data, batch=100).run_until_empty()  # the next start
    assert store.count_feedback(pushed=False) == 0
    assert store.count_feedback() == before
    _check_online(data, db)


def test_the_feature_repository_folder_applies_with_the_feast_cli(tmp_path: Path, repo_root: Path) -> None:
    """`feast apply` (Feast's own CLI) on a copy of feedback/feature_repo registers the views the
    loop pushes to, with the schema the code declares."""
    import shutil

    from feast import FeatureStore

    repo = tmp_path / "feature_repo"
    shutil.copytree(repo_root / "feedback" / "feature_repo", repo, ignore=shutil.ignore_patterns("data"))
    feast = Path(sys.executable).parent / "feast"
    done = subprocess.run([str(feast), "apply"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    views = {v.name: v for v in FeatureStore(repo_path=str(repo)).list_feature_views()}
    assert set(views) == {"feedback_stats", "revision_drift"}
    assert sorted(views["feedback_stats"].entities) == ["model_revision", "prompt_variant"]
    assert {f.name for f in views["feedback_stats"].features} >= {"feedback_score", "feedback_count", "error_rate",
                                                                   "latency_p95_s", "joules_per_token"}  # fmt: skip


def test_the_cli_pushes_the_spool_and_prints_the_online_features(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from autoglm_operator.cli.main import cli

    db, data = tmp_path / "fb.db", tmp_path / "feast"
    store = FeedbackStore(f"sqlite:///{db}")
    _fill(store, 120)
    url = ["--feedback-url", store.url, "--feast-dir", str(data)]
    pushed = CliRunner().invoke(cli, ["feedback", "push", *url, "--once"])
    assert pushed.exit_code == 0, pushed.output
    assert f"replaying {store.count_feedback()} feedback events not pushed yet" in pushed.output
    shown = CliRunner().invoke(cli, ["feedback", "features", "m", *url, "-o", "json"])
    assert shown.exit_code == 0, shown.output
    rows = {(r["revision"], r["prompt_variant"]): r for r in json.loads(shown.output)}
    oracle = _oracle(db)
    assert set(rows) == set(oracle.index)
    for key, row in oracle.iterrows():
        assert rows[key]["feedback_count"] == row["count"]
    bad = CliRunner().invoke(cli, ["feedback", "features", "m", *url, "--online-store", "memcached://x"])
    assert bad.exit_code != 0
    assert "use sqlite, redis://HOST:PORT or postgresql://USER:PASS@HOST/DB" in bad.output
