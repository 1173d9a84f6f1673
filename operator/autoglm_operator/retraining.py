"""Retraining revisions in the reconcile core's terms (pure).

A retraining revision is the spec with a fine-tune added (``spec.training``: the dataset the
feedback loop exported, with its SHA-256), so it is content-addressed like any other revision and
``plan()`` builds and canaries it like any other: the fine-tune is kept in the status
(``status.retraining``), never written into the user's spec (a GitOps tool would report that as
drift). ``effective`` gives the model ``plan()`` and the pipeline see: the candidate's fine-tune
while one is tried, else the stable revision's, else the spec's own ``training`` (a user's dataset,
which a retraining revision's replaces); its settings (rank, epochs, ...) are
``spec.feedback.retraining.fineTune``. ``settle`` follows the rollout's outcome: a promoted candidate's
fine-tune becomes the stable one, a rejected one is dropped (the stable revision keeps serving,
and the spec's revision is the stable one again).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from autoglm_api.resource import AutoGLMModel
from autoglm_api.spec import FineTune, Training
from autoglm_api.status import AutoGLMModelStatus, Retraining
from autoglm_core.variants import rollout_revision


def with_training(model: AutoGLMModel, training: Training | None) -> AutoGLMModel:
    if training is None or training == model.spec.training:
        return model
    return model.model_copy(update={"spec": model.spec.model_copy(update={"training": training})})


def effective(model: AutoGLMModel) -> AutoGLMModel:
    """``model`` with the fine-tune its rollout builds: the retraining candidate's, else the stable one's."""
    retraining = (model.status or AutoGLMModelStatus()).retraining
    if retraining is None:
        return model
    return with_training(model, retraining.candidate or retraining.stable)


def fine_tune(settings: FineTune, dataset: str, sha256: str, against: str | None = None) -> Training:
    """The fine-tune of a retraining revision: ``spec.feedback.retraining.fineTune`` on ``dataset``,
    judged against the artifact ``against`` (the stable revision's) on the held-out feedback."""
    return Training(**settings.model_dump(), dataset=dataset, sha256=sha256, against=against)


@dataclass(frozen=True)
class Settled:
    status: AutoGLMModelStatus
    #: "promoted" or "rejected" when the candidate's rollout ended at this tick, else "".
    outcome: str = ""
    revision: str = ""


def settle(model: AutoGLMModel, status: AutoGLMModelStatus) -> Settled:
    """``status`` (after ``plan()``) with the retraining candidate promoted to stable or dropped
    when its rollout ended: ``model`` is the manifest (without the effective fine-tune)."""
    retraining = status.retraining
    if retraining is None or retraining.candidate is None:
        return Settled(status)
    revision = rollout_revision(with_training(model, retraining.candidate).spec)
    if status.revisions.stable == revision and status.revisions.candidate is None:
        done = retraining.model_copy(
            update={"stable": retraining.candidate, "candidate": None, "outcome": "Promoted"}
        )
        return Settled(status.model_copy(update={"retraining": done}), "promoted", revision)
    if status.revisions.rejected == revision:
        done = retraining.model_copy(update={"candidate": None, "outcome": "Rejected"})
        return Settled(status.model_copy(update={"retraining": done}), "rejected", revision)
    return Settled(status)


def can_trigger(status: AutoGLMModelStatus) -> bool:
    """No rollout runs (nor a retraining candidate waits) and a compressed revision serves."""
    revisions = status.revisions
    pending = status.retraining is not None and status.retraining.candidate is not None
    return (
        bool(revisions.stable) and revisions.candidate is None and revisions.baseline is None and not pending
    )


def triggered(
    status: AutoGLMModelStatus,
    candidate: Training,
    *,
    revision: str,
    feedback: int,
    reason: str,
    examples: int,
    now: datetime,
) -> AutoGLMModelStatus:
    """``status`` with a retraining candidate: the next ``plan()`` builds its revision."""
    previous = status.retraining or Retraining()
    retraining = previous.model_copy(
        update={"candidate": candidate, "triggered_at": now, "reason": reason[:4096], "revision": revision,
                "feedback": feedback, "examples": examples, "outcome": ""}
    )  # fmt: skip
    return status.model_copy(update={"retraining": retraining})


def stage(retraining: Retraining | None) -> str | None:
    """Where the last retraining stands, for people: ``building or canarying``, ``promoted`` or
    ``rejected``; None when none was triggered."""
    if retraining is None or retraining.triggered_at is None:
        return None
    return "building or canarying" if retraining.candidate is not None else (retraining.outcome or "").lower()
