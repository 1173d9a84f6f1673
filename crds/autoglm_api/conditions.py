"""Condition types, reasons and pure setters (the semantics of apimachinery's SetStatusCondition)."""

from __future__ import annotations

from datetime import datetime
from typing import Final

from autoglm_api.status import Condition, ConditionStatus

# Condition types.
READY: Final = "Ready"
COMPRESSED: Final = "Compressed"
VALIDATED: Final = "Validated"
ROLLED_OUT: Final = "RolledOut"
DEGRADED: Final = "Degraded"

# Reasons: CamelCase, next to the types they explain.
PIPELINE_RUNNING: Final = "PipelineRunning"
PIPELINE_FAILED: Final = "PipelineFailed"
GATES_PASSED: Final = "GatesPassed"
GATES_FAILED: Final = "GatesFailed"
CANARY_PROGRESSING: Final = "CanaryProgressing"
PROMOTED: Final = "Promoted"
ROLLED_BACK: Final = "RolledBack"
INVALID_SPEC: Final = "InvalidSpec"


def find_condition(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    *,
    now: datetime,
    observed_generation: int | None = None,
) -> tuple[list[Condition], bool]:
    """Return the conditions with ``type_`` set, and whether anything changed.

    Pure: the input list is not modified and ``now`` is passed in. ``lastTransitionTime`` moves
    only when the status changes, so a condition that stays True keeps the time it became True.
    """
    current = find_condition(conditions, type_)
    if current is None:
        new = Condition(
            type=type_, status=status, reason=reason, message=message,
            last_transition_time=now, observed_generation=observed_generation,
        )  # fmt: skip
        return [*conditions, new], True
    transition = current.last_transition_time if current.status == status else now
    new = current.model_copy(
        update={
            "status": status, "reason": reason, "message": message,
            "last_transition_time": transition, "observed_generation": observed_generation,
        }
    )  # fmt: skip
    if new == current:
        return list(conditions), False
    return [new if c.type == type_ else c for c in conditions], True
