"""``STEP.json``: what a step did, what it wrote (with SHA-256) and what it measured.

A step whose ``STEP.json`` says it succeeded for the same inputs, and whose files still hash to
what it recorded, is not run again: that is what makes the local runner resumable and Argo
retries cheap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_serializer

from autoglm_core.camel import CamelModel
from autoglm_core.digests import hash_tree

RESULT_FILE = "STEP.json"
#: The validate step's report: figures of baseline and candidate, and each gate's verdict.
VALIDATE_REPORT = "validate.json"


def step_files(folder: Path) -> dict[str, str]:
    """SHA-256 of every file a step wrote in ``folder``, by relative path (STEP.json left out)."""
    return hash_tree(folder, exclude={RESULT_FILE})


class StepResult(CamelModel):
    step: str
    status: Literal["Succeeded", "Failed"]
    reason: str = ""
    inputs_digest: str
    started_at: str
    duration_seconds: float
    parameters: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)

    @field_serializer("duration_seconds")
    def _milliseconds(self, seconds: float) -> float:
        return round(seconds, 3)


def write_result(folder: Path, result: StepResult) -> None:
    """Write STEP.json atomically (a reader never sees half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (RESULT_FILE + ".partial")
    partial.write_text(json.dumps(result.to_json(), indent=2, sort_keys=False))
    os.replace(partial, folder / RESULT_FILE)


def read_result(folder: Path) -> StepResult | None:
    try:
        return StepResult.from_json(json.loads((folder / RESULT_FILE).read_text()))
    except (OSError, ValueError, ValidationError):
        return None


def completed(folder: Path, inputs_digest: str) -> StepResult | None:
    """The earlier result if the step succeeded for these inputs and its files are intact."""
    result = read_result(folder)
    if result is None or result.status != "Succeeded" or result.inputs_digest != inputs_digest:
        return None
    if step_files(folder) != result.files:
        return None
    return result
