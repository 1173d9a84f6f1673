"""Canary retraining in `autoglm run`, on real parts (a tiny GLM): users rate the served answers on
POST /v1/feedback and correct them; their questions drift to another topic; the drift, measured
from the request log through Feast, triggers a retraining revision; the pipeline fine-tunes the
source on the corrections (LoRA), validates it on Hamlet and on held-out feedback, and it is
canaried against stable on live traffic and promoted. Every step is in the ledger."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import httpx
import pytest

from autoglm_api.validation import load_manifest
from autoglm_core.audit import Ledger
from autoglm_core.variants import rollout_revision
from autoglm_operator.embedded import EmbeddedLoop, LoopOptions
from autoglm_operator.retraining import effective
from tests.integration.test_embedded_loop import ROLLOUT, slow_source
from tests.support.loop import isolated_loop_env
from tests.support.tiny_models import tiny_glm
from tests.unit.test_pipeline_steps import manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

BEFORE = ("Who is Hamlet?", "Where is Elsinore?", "Who is Ophelia?")
AFTER = (
    "Explain how a hash table resolves collisions with open addressing and with chaining in detail?",
    "Why do databases keep their indexes in B-trees rather than in binary search trees, exactly?",
)
CORRECTION = "Elsinore."
DRIFT_AFTER = 60


class Users(threading.Thread):
    """Users who want one answer: they rate it 1, and anything else at most 0.5, correcting it;
    after ``DRIFT_AFTER`` questions they ask about something else, at greater length."""

    def __init__(self, loop: EmbeddedLoop) -> None:
        super().__init__(daemon=True)
        self.loop, self.stop = loop, threading.Event()
        self.asked = self.rated = 0
        #: Questions asked before the drift (set once the first revision is promoted).
        self.drift_after: int | None = None

    def run(self) -> None:
        rng = random.Random(7)
        while not self.stop.wait(0.05):
            server = self.loop.server
            if server is None:
                continue
            questions = AFTER if self.asked >= DRIFT_AFTER else BEFORE
            body = {
                "model": "tiny",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": rng.choice(questions)}],
            }
            try:
                answer = httpx.post(f"{server.url}/openai/v1/chat/completions", json=body, timeout=60)
                if answer.status_code != 200:
                    continue
                self.asked += 1
                text = answer.json()["choices"][0]["message"]["content"].strip()
                rating: dict[str, object] = {"request_id": answer.headers["x-request-id"], "source": "users"}
                if text == CORRECTION:
                    rating["score"] = 1.0
                else:
                    rating.update(score=round(rng.random() / 2, 3), correction=CORRECTION)
                if httpx.post(f"{server.url}/v1/feedback", json=rating, timeout=30).status_code == 200:
                    self.rated += 1
            except httpx.HTTPError:  # a swap in between
                continue


@pytest.mark.e2e  # slow (35-55 s): make test-e2e, keeping make test under 15 minutes
def test_injected_drift_triggers_a_retraining_revision_that_is_canaried_and_promoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = isolated_loop_env(tmp_path, monkeypatch)
    source = tiny_glm(tmp_path / "glm", init_std=0.3, seed=3)
    retraining = {
        # PSI on windows of 40 requests among 3 questions is noisy (0.34 seen without a drift): a
        # threshold above that noise; the injected drift measures 3 to 10
        "enabled": True, "feedbackScoreBelow": 0.0, "driftAbove": 1.0, "minFeedback": 30,
        # the tiny GLM learns a new answer at this rate and keeps its Hamlet perplexity (at 0.01 for
        # 4 epochs it lost 108% and the quality gate rejected the retraining revision)
        "fineTune": {"epochs": 2, "learningRate": 0.003},
    }  # fmt: skip
    # the users rate the untrained model low: no absolute floor (a candidate significantly worse
    # than stable on the users' scores still fails its interval)
    rollout = {**ROLLOUT, "analysis": {**ROLLOUT["analysis"], "minFeedbackScore": 0.0}}  # type: ignore[dict-item]
    path = manifest(
        tmp_path, source, compression={"quantization": {"method": "int8-weight-only"}}, rollout=rollout,
        engine="torch", feedback={"retraining": retraining},
    )  # fmt: skip
    lines: list[str] = []
    options = LoopOptions(
        # no demo traffic: the users' questions are all the traffic, canaries included
        state_dir=tmp_path / "state", traffic_rate=0, tick_seconds=0.5, timeout_seconds=600,
        audit_url=audit, pipeline_args=("--decode-tokens", "4"), drift_window=40,
        server_args=slow_source(tmp_path, monkeypatch, path), log=lines.append,
    )  # fmt: skip
    loop = EmbeddedLoop(path, options)
    users = Users(loop)
    users.start()
    try:
        first = loop.run()  # the first rollout, promoted
        stable = first.revisions.stable
        assert stable == rollout_revision(load_manifest(str(path)).spec)
        users.drift_after = users.asked + DRIFT_AFTER
        loop.options.until = "retrained"
        status = loop.run()
    finally:
        users.stop.set()
        loop.close()
    assert users.drift_after is not None
    assert users.asked > users.drift_after, lines
    retrained = status.retraining
    assert retrained is not None, lines
    assert retrained.outcome == "Promoted", "\n".join(lines)
    assert retrained.revision == stable
    assert retrained.stable is not None
    assert "is above driftAbove 1" in retrained.reason
    new = status.revisions.stable
    assert new not in (None, stable)
    assert new == rollout_revision(
        effective(load_manifest(str(path)).model_copy(update={"status": status})).spec
    )
    # the manifest on disk is untouched: the fine-tune lives in the status
    assert load_manifest(str(path)).spec.training is None

    with Ledger(audit) as ledger:
        records = list(ledger.query(namespace="ml", model="tiny", limit=200))
    by_kind: dict[str, list] = {}
    for r in records:
        by_kind.setdefault(r.decision, []).append(r)
    (trigger,) = by_kind["RetrainingTriggered"]
    assert trigger.revision == stable
    assert trigger.evidence["drift"]["drift_statistic"] > 1.0
    assert trigger.evidence["retrainingRevision"] == new
    # the fine-tune is judged against what serves: the stable revision's published artifact
    assert trigger.evidence["training"]["against"].startswith("file://")
    data = trigger.evidence["dataset"]
    assert data["corrections"] == data["kept"] >= 30  # nothing was right before
    dataset = Path(data["uri"].removeprefix("file://"))
    examples = [json.loads(line) for line in dataset.read_text().splitlines()]
    assert {e["messages"][-1]["content"] for e in examples} == {CORRECTION}
    assert any(e["messages"][-2]["content"] in AFTER for e in examples)  # the new topic is learnt too
    # the retraining revision's pipeline, gates (the held-out feedback among them), canary, promotion
    assert any(r.revision == new for r in by_kind["PipelineStarted"])
    (gate,) = [r for r in by_kind["GatePassed"] if r.revision == new]
    gates = {g["name"]: g for g in gate.evidence["gates"]}
    assert gates["heldOutNllRatio"]["passed"]
    assert gates["heldOutNllRatio"]["value"] < 1.0
    assert gate.evidence["heldOut"]["against"] == "stable"
    # ... and the validation text against the stable artifact too, not only against the source
    assert gates["maxQualityLossVsStable"]["passed"]
    assert gate.evidence["qualityLossVsStable"] == gates["maxQualityLossVsStable"]["value"]
    assert any(r.revision == new for r in by_kind["CanaryStarted"])
    (promoted,) = [r for r in by_kind["Promoted"] if r.revision == new]
    assert promoted.evidence["previous"] == stable
    assert promoted.evidence["analysis"]["outcome"] == "Successful"
    # the order the loop took them in
    times = [trigger.time, gate.time, promoted.time]
    assert times == sorted(times)
