"""The local runner tells a reused step from a run one by its STEP.json, never by its output."""

from __future__ import annotations

from autoglm_pipelines.executor import _reused
from autoglm_pipelines.results import StepResult

EARLIER = StepResult(
    step="fetch",
    status="Succeeded",
    inputs_digest="d" * 64,
    started_at="2026-12-01T10:00:00+00:00",
    duration_seconds=3.0,
)


def replace(result: StepResult, **changes: object) -> StepResult:
    return result.model_copy(update=changes)


def test_an_untouched_success_is_reused() -> None:
    assert _reused(EARLIER, replace(EARLIER))


def test_a_step_that_ran_again_is_not_reused() -> None:
    assert not _reused(EARLIER, replace(EARLIER, started_at="2026-12-01T11:00:00+00:00"))
    assert not _reused(EARLIER, replace(EARLIER, inputs_digest="e" * 64))


def test_a_first_run_or_a_failure_is_not_reused() -> None:
    assert not _reused(None, EARLIER)
    assert not _reused(EARLIER, None)
    failed = replace(EARLIER, status="Failed")
    assert not _reused(failed, failed)
