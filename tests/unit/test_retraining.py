"""Canary retraining's decisions: the trigger, the dataset of rated requests, and the retraining
revision in the reconcile core's terms (a fine-tune kept in the status, built and settled like any
revision)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from autoglm_api.spec import FineTune, Retraining, Training
from autoglm_api.status import AutoGLMModelStatus, Revisions
from autoglm_api.status import Retraining as RetrainingStatus
from autoglm_api.validation import load_manifest
from autoglm_core.feedback.store import RatedRequest
from autoglm_core.revision import artifact_revision
from autoglm_core.variants import rollout_revision
from autoglm_feedback.retraining import dataset, trigger
from autoglm_operator.plan import Observed, plan
from autoglm_operator.retraining import can_trigger, effective, fine_tune, settle, triggered

NOW = datetime(2026, 12, 3, tzinfo=UTC)
SPEC = Retraining(enabled=True, feedback_score_below=0.5, drift_above=0.2, min_feedback=100)
CALM = {"drift_statistic": 0.05, "drift_prompt_length": 0.05, "drift_vocabulary": 0.01, "drift_score": 0.0}


def test_a_low_mean_score_over_enough_feedback_triggers() -> None:
    assert trigger(SPEC, revision="r1", feedback_count=99, feedback_sum=10.0, drift=CALM) is None  # too few
    found = trigger(SPEC, revision="r1", feedback_count=100, feedback_sum=40.0, drift=CALM)
    assert found is not None
    assert "mean feedback score 0.400 over 100 events is below feedbackScoreBelow 0.5" in found.reason
    assert found.evidence["meanScore"] == pytest.approx(0.4)
    # a good score and no drift: nothing
    assert trigger(SPEC, revision="r1", feedback_count=500, feedback_sum=400.0, drift=CALM) is None


def test_drift_above_the_threshold_triggers_and_names_its_parts() -> None:
    drifted = {
        "drift_statistic": 0.9,
        "drift_prompt_length": 0.9,
        "drift_vocabulary": 0.4,
        "drift_score": None,
    }
    found = trigger(SPEC, revision="r1", feedback_count=120, feedback_sum=100.0, drift=drifted)
    assert found is not None
    assert found.reason == "drift 0.900 (prompt_length 0.900, vocabulary 0.400) is above driftAbove 0.2"


def test_the_same_revision_needs_min_feedback_new_events_before_it_triggers_again() -> None:
    low = {"feedback_count": 150, "feedback_sum": 30.0, "drift": CALM}
    assert trigger(SPEC, revision="r1", since=100, **low) is None  # 50 new events
    assert trigger(SPEC, revision="r1", since=50, **low) is not None
    assert trigger(SPEC.model_copy(update={"enabled": False}), revision="r1", **low) is None


def rated(i: int, score: float, *, output: str = "An answer.", correction: str | None = None,
          prompt: str | None = None, variant: str = "concise") -> RatedRequest:  # fmt: skip
    chat = json.dumps([{"role": "user", "content": f"Question {i}?"}])
    return RatedRequest(
        request_id=f"req-{i}", time=float(i), revision="r1", prompt_variant=variant, score=score,
        correction=correction, prompt=chat if prompt is None else prompt, output=output,
    )  # fmt: skip


def test_the_dataset_keeps_corrections_and_the_better_half_and_adds_the_variants_system_prompt() -> None:
    rows = [
        rated(1, 0.9, output="Short."),
        rated(2, 0.1, output="A very long rambling answer."),
        rated(3, 0.0, output="Wrong.", correction="The right answer."),
        rated(4, 0.6, output="Fine.", variant="none"),
        rated(5, 0.2, output="Meh."),
        rated(6, 0.7, prompt='[{"role": "user", "content": "cut off'),  # the log's copy was truncated
    ]
    data = dataset(rows, {"concise": "Answer in one short sentence."})
    # the median of the uncorrected scores (0.9, 0.1, 0.6, 0.2, 0.7) is 0.6
    assert data.counts == {
        "rated": 6,
        "kept": 3,
        "corrections": 1,
        "lowScored": 2,
        "unusable": 1,
        "keepAbove": 0.6,
    }
    first, correction, plain = data.examples
    assert first["messages"] == [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "Question 1?"},
        {"role": "assistant", "content": "Short."},
    ]
    assert correction["messages"][-1] == {"role": "assistant", "content": "The right answer."}
    assert plain["messages"][0] == {"role": "user", "content": "Question 4?"}  # no variant applied: none
    lines = [json.loads(line) for line in data.jsonl().splitlines()]
    assert lines == list(data.examples)


def test_all_zero_scores_keep_nothing() -> None:
    assert dataset([rated(i, 0.0) for i in range(10)], {}).examples == ()


# -- the revision -----------------------------------------------------------------------------------


@pytest.fixture
def model(repo_root: Path):  # type: ignore[no-untyped-def]
    return load_manifest(str(repo_root / "examples" / "autoglm-model.yaml"))


def test_a_fine_tune_is_part_of_the_revision_and_spec_without_one_keeps_its_revision(model) -> None:  # type: ignore[no-untyped-def]
    before = artifact_revision(model.spec)
    tune = fine_tune(FineTune(), "file:///data/a.jsonl", "a" * 64)
    assert tune == Training(dataset="file:///data/a.jsonl", sha256="a" * 64)
    tuned = model.model_copy(
        update={"status": AutoGLMModelStatus(retraining=RetrainingStatus(candidate=tune))}
    )
    assert artifact_revision(effective(tuned).spec) != before
    other = fine_tune(FineTune(), "file:///data/a.jsonl", "b" * 64)  # same file name, other content
    retuned = model.model_copy(
        update={"status": AutoGLMModelStatus(retraining=RetrainingStatus(candidate=other))}
    )
    assert artifact_revision(effective(retuned).spec) != artifact_revision(effective(tuned).spec)
    # the user's manifest is untouched: the fine-tune lives in the status
    assert model.spec.training is None
    assert "training" not in model.spec.to_json()
    # retraining.fineTune's settings
    assert fine_tune(FineTune(rank=4, epochs=1), "file:///fb.jsonl", "c" * 64) == Training(
        dataset="file:///fb.jsonl", sha256="c" * 64, rank=4, epochs=1
    )


def test_a_triggered_retraining_is_built_by_plan_then_settled_when_promoted_or_rejected(model) -> None:  # type: ignore[no-untyped-def]
    stable = rollout_revision(model.spec)
    status = AutoGLMModelStatus(phase="Serving", revisions=Revisions(stable=stable))
    assert can_trigger(status)
    tune = fine_tune(FineTune(), "file:///data/a.jsonl", "a" * 64)
    status = triggered(status, tune, revision=stable, feedback=250, reason="drift", examples=40, now=NOW)
    assert not can_trigger(status)  # one retraining at a time
    current = model.model_copy(update={"status": status})
    retrained = rollout_revision(effective(current).spec)
    assert retrained != stable
    result = plan(effective(current), Observed(), NOW)
    assert [(a.kind, a.revision) for a in result.actions] == [("StartPipeline", retrained)]
    assert result.status.revisions.candidate == retrained
    assert result.status.revisions.stable == stable

    # promoted: the fine-tune becomes the stable one, and stays with later ticks
    promoted = result.status.model_copy(update={"revisions": Revisions(stable=retrained)})
    done = settle(model, promoted)
    assert done.outcome == "promoted"
    assert done.revision == retrained
    assert done.status.retraining is not None
    assert done.status.retraining.stable == tune
    assert done.status.retraining.candidate is None
    assert done.status.retraining.outcome == "Promoted"
    again = model.model_copy(update={"status": done.status})
    assert rollout_revision(effective(again).spec) == retrained
    assert plan(effective(again), Observed(), NOW).actions == ()

    # rejected: dropped, and the stable revision is what the spec asks for again
    rejected = result.status.model_copy(update={"revisions": Revisions(stable=stable, rejected=retrained)})
    dropped = settle(model, rejected)
    assert dropped.outcome == "rejected"
    assert dropped.status.retraining is not None
    assert dropped.status.retraining.candidate is None
    assert dropped.status.retraining.outcome == "Rejected"
    back = model.model_copy(update={"status": dropped.status})
    assert rollout_revision(effective(back).spec) == stable
    assert plan(effective(back), Observed(), NOW).actions == ()
    assert can_trigger(dropped.status)
