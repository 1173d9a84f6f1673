"""``AutoGLMModel.status``: what the operator observed and decided. Written only by the operator."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from autoglm_api.base import ApiModel
from autoglm_api.spec import PromptVariant, Training

Phase = Literal[
    "Pending", "Compressing", "Validating", "RollingOut", "Serving", "Retraining", "Degraded", "Failed"
]
ConditionStatus = Literal["True", "False", "Unknown"]
CAMEL_CASE_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
RevisionId = Annotated[str, Field(max_length=128)]


class Condition(ApiModel):
    """A standard Kubernetes condition (the shape of metav1.Condition)."""

    type: Annotated[str, Field(pattern=CAMEL_CASE_PATTERN, max_length=316)] = Field(
        description="Condition type in CamelCase, e.g. Ready, Validated, CanaryHealthy."
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: Annotated[str, Field(pattern=CAMEL_CASE_PATTERN, min_length=1, max_length=1024)] = Field(
        description="Why the condition last changed, a CamelCase word."
    )
    message: Annotated[str, Field(max_length=32768)] = Field(default="", description="Details for a person.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed from."
    )


class Revisions(ApiModel):
    """Content-addressed revisions: the one serving and the one being rolled out."""

    stable: RevisionId | None = Field(default=None, description="Revision serving all traffic.")
    candidate: RevisionId | None = Field(default=None, description="Revision under validation or canary.")
    rejected: RevisionId | None = Field(
        default=None,
        description="The last candidate that failed its pipeline or gates, or was rolled back: not tried again "
        "until the spec changes or a retry is asked for.",
    )
    baseline: RevisionId | None = Field(
        default=None,
        description="Set while the stable revision is the uncompressed source, served on a first rollout so "
        "that the candidate is canaried against it on live traffic; cleared once a candidate is promoted.",
    )


class CanaryStatus(ApiModel):
    """Where the canary stands."""

    step: int | None = Field(default=None, ge=0, description="Index of the current canary step.")
    weight: int = Field(default=0, ge=0, le=100, description="Percent of traffic on the candidate.")
    failures: int = Field(default=0, ge=0, description="Failed analysis intervals in this canary so far.")
    step_started_at: datetime | None = Field(default=None, description="When the current canary step began.")


class TargetStatus(ApiModel):
    """What one target serves."""

    name: Annotated[str, Field(max_length=63)] = Field(description="Target name.")
    revision: RevisionId | None = Field(
        default=None, description="Revision serving on this target (the variant of its precision)."
    )
    candidate: RevisionId | None = Field(
        default=None, description="The candidate's revision on this target while a rollout runs."
    )
    url: Annotated[str, Field(max_length=2048)] | None = Field(default=None, description="Inference URL.")
    ready: bool = Field(default=False, description="Whether the target serves traffic.")
    replicas: int = Field(default=0, ge=0, description="Ready replicas.")


class Decision(ApiModel):
    """The newest autonomous decision; the audit ledger holds all of them."""

    kind: Annotated[str, Field(max_length=64)] = Field(
        description="Decision kind, e.g. Promoted, RolledBack."
    )
    time: datetime = Field(description="When it was taken.")
    audit_id: Annotated[str, Field(max_length=64)] = Field(description="Audit ledger record id.")
    reason: Annotated[str, Field(max_length=32768)] = Field(default="", description="Why, with the figures.")


class PromptPolicy(ApiModel):
    """The traffic share of each prompt variant, as the feedback loop's bandit last published it."""

    algorithm: Annotated[str, Field(max_length=32)] = Field(description="thompson, ucb or reinforce.")
    revision: RevisionId | None = Field(default=None, description="The revision whose feedback decided it.")
    shares: dict[Annotated[str, Field(max_length=63)], Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default={}, description="Each variant's share of chat requests; they sum to 1."
    )
    feedback: int = Field(default=0, ge=0, description="Feedback events behind these shares.")
    held: list[Annotated[str, Field(max_length=63)]] = Field(
        default=[],
        max_length=32,
        description="Variants held at an equal share at most: their step failed the analysis gates.",
    )
    updated_at: datetime | None = Field(default=None, description="When the shares were last published.")
    proposals: list[PromptVariant] = Field(
        default=[],
        max_length=3,
        description="System prompts the served model proposed (OPRO), arms beside the spec's variants.",
    )


class Retraining(ApiModel):
    """Canary retraining (spec.feedback.retraining): the fine-tune on collected feedback the revision
    being rolled out adds to the spec, and the one the stable revision was built with."""

    candidate: Training | None = Field(
        default=None,
        description="The fine-tune of the retraining revision being built or canaried; cleared when it is "
        "promoted (it becomes stable) or rejected.",
    )
    stable: Training | None = Field(
        default=None,
        description="The fine-tune the stable revision was built with (kept by later spec edits).",
    )
    triggered_at: datetime | None = Field(default=None, description="When retraining was last triggered.")
    reason: Annotated[str, Field(max_length=4096)] = Field(default="", description="Why, with the figures.")
    revision: RevisionId | None = Field(
        default=None, description="The stable revision whose feedback and drift triggered it."
    )
    feedback: int = Field(
        default=0,
        ge=0,
        description="That revision's feedback events when it was triggered (the next "
        "trigger on the same revision needs minFeedback more).",
    )
    examples: int = Field(default=0, ge=0, description="Examples in the dataset (training and held out).")
    outcome: Literal["", "Promoted", "Rejected"] = Field(
        default="", description="How the last retraining revision's rollout ended (empty while it runs)."
    )


class AutoGLMModelStatus(ApiModel):
    """The observed state of one served model."""

    phase: Phase = Field(default="Pending", description="Lifecycle phase.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the status reflects."
    )
    revisions: Revisions = Field(default=Revisions(), description="Stable and candidate revisions.")
    canary: CanaryStatus = Field(default=CanaryStatus(), description="Canary progress.")
    conditions: list[Condition] = Field(default=[], max_length=32, description="Standard conditions.")
    targets: list[TargetStatus] = Field(default=[], max_length=16, description="Per-target serving state.")
    last_decision: Decision | None = Field(default=None, description="The newest autonomous decision.")
    prompt_policy: PromptPolicy | None = Field(
        default=None, description="Prompt variants' traffic shares (spec.feedback.promptOptimization)."
    )
    retraining: Retraining | None = Field(
        default=None,
        description="Retraining revisions triggered by feedback or drift (spec.feedback.retraining).",
    )
