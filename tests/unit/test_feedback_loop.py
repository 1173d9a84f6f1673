"""The embedded feedback loop's file: what the servers read, written from the manifest and the policy."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import yaml

from autoglm_api.status import AutoGLMModelStatus, PromptPolicy, Revisions
from autoglm_api.validation import load_manifest
from autoglm_inference.prompts import PromptVariants
from autoglm_operator.feedback_loop import FeedbackLoop, variants_document


def test_the_variants_file_follows_the_policy_and_manifest_edits(tmp_path: Path, repo_root: Path) -> None:
    model = load_manifest(str(repo_root / "examples" / "autoglm-model.yaml"))
    loop = FeedbackLoop(tmp_path, say=lambda _line: None)
    args = loop.server_args(model)
    assert args == [
        "--feedback-url",
        f"sqlite:///{tmp_path / 'feedback.db'}",
        "--prompt-variants",
        str(loop.variants_path),
    ]
    served = PromptVariants(loop.variants_path)  # the server's own reader
    assert served.current().weights == {"concise": 0.5, "detailed": 0.5}
    assert served.current().texts["concise"] == "Answer in one short sentence."

    # The status holds a published policy: the file follows it at the next tick.
    status = AutoGLMModelStatus(
        revisions=Revisions(stable="r1"),
        prompt_policy=PromptPolicy(
            algorithm="thompson", revision="r1", shares={"concise": 0.8, "detailed": 0.2}
        ),
    )
    loop.tick(model, status, datetime(2026, 12, 2, tzinfo=UTC))
    assert yaml.safe_load(loop.variants_path.read_text())["weights"] == {"concise": 0.8, "detailed": 0.2}

    # An edited manifest's texts reach the file too.
    edited = model.model_copy(deep=True)
    edited.spec.feedback.prompt_optimization.variants[0].system = "Be terse."
    loop.tick(edited, status, datetime(2026, 12, 2, tzinfo=UTC))
    assert yaml.safe_load(loop.variants_path.read_text())["variants"]["concise"] == "Be terse."


def test_without_prompt_optimization_the_document_leaves_prompts_alone(
    repo_root: Path, tmp_path: Path
) -> None:
    model = load_manifest(str(repo_root / "examples" / "autoglm-model.yaml"))
    off = model.model_copy(deep=True)
    off.spec.feedback.prompt_optimization.enabled = False
    path = tmp_path / "v.yaml"
    path.write_text(variants_document(off, None))
    assert PromptVariants(path).resolve(None) == ("none", None)


def test_a_proposal_from_the_served_model_joins_the_arms_and_the_servers_file(
    tmp_path: Path, repo_root: Path
) -> None:
    import time

    from autoglm_core.feedback.records import RequestRecord, parse_feedback
    from autoglm_core.feedback.store import FeedbackStore
    from autoglm_operator.feedback_loop import arms_of

    model = load_manifest(str(repo_root / "examples" / "autoglm-model.yaml"))
    asked: list[str] = []

    def ask(_model: object, messages: list[dict[str, str]]) -> str:
        asked.append(messages[0]["content"])
        return 'Prompt: "Reply in five words or fewer."'

    loop = FeedbackLoop(tmp_path, say=lambda _line: None, ask=ask)
    loop.server_args(model)
    store = FeedbackStore(loop.url)
    now = time.time()
    store.add_requests([
        RequestRecord(f"q{i}", now + i, "support-glm", "r1", ("concise", "detailed")[i % 2], "local", 0.2, 9, 20, 0.3,
                      "cpu-time-model", "ok")
        for i in range(60)
    ])  # fmt: skip
    store.accept(parse_feedback({"feedback": [{"request_id": f"q{i}", "score": 0.8 if i % 2 == 0 else 0.2}
                                              for i in range(60)]}))  # fmt: skip
    status = AutoGLMModelStatus(revisions=Revisions(stable="r1"))
    status, records = loop.tick(model, status, datetime(2026, 12, 2, tzinfo=UTC))
    policy = status.prompt_policy
    assert policy is not None
    assert [p.system for p in policy.proposals] == ["Reply in five words or fewer."]
    proposed = [r for r in records if r.kind == "PromptProposed"]
    assert len(proposed) == 1
    assert proposed[0].evidence["text"] == "Reply in five words or fewer."
    assert "Prompt: Think" not in asked[0]
    assert "Rating: 0.80 (30 ratings)" in asked[0]
    assert [a.name for a in arms_of(model, policy)] == ["concise", "detailed", policy.proposals[0].name]
    served = PromptVariants(loop.variants_path).current()  # the server's reader sees the new arm
    assert served.texts[policy.proposals[0].name] == "Reply in five words or fewer."
    # Not again until the new arm has its own 20 ratings.
    _, again = loop.tick(model, status, datetime(2026, 12, 2, 0, 5, tzinfo=UTC))
    assert not [r for r in again if r.kind == "PromptProposed"]
    assert len(asked) == 1
