"""Whether a step can be skipped: its inputs' identity, computed without importing torch.

Kept apart from ``steps.py`` so that a step whose inputs are unchanged returns in well under a
second, instead of paying for the model libraries' import first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from autoglm_api.resource import AutoGLMModel
from autoglm_pipelines.dag import pipeline_steps
from autoglm_pipelines.results import StepResult, canonical_digest, completed, read_result

#: The part of the spec each step depends on (the rest reaches it through its inputs' hashes).
_SPEC_PARTS: dict[str, Callable[[AutoGLMModel], Any]] = {
    "fetch": lambda m: m.spec.source.to_json(),
    "search": lambda m: m.spec.compression.to_json(),
    "compress": lambda m: m.spec.compression.to_json(),
    "calibrate": lambda m: m.spec.calibration.to_json(),
    "validate": lambda m: m.spec.validation.to_json(),
    "publish": lambda m: {"model": m.namespaced_name},
}


def inputs_digest(
    model: AutoGLMModel, step: str, workdir: Path, *, decode_tokens: int, output: Path | None
) -> str:
    """The identity of ``step``'s inputs: its part of the spec and the hashes of its inputs' files."""
    deps = {s.name: s.depends for s in pipeline_steps(model.spec)}.get(step, ())
    upstream = {dep: (r.files if (r := read_result(workdir / dep)) else None) for dep in deps}
    options: dict[str, Any] = {}
    if step == "validate":
        options = {"decodeTokens": decode_tokens}
    elif step == "publish":
        options = {"output": str(output) if output else None}
    return canonical_digest({"step": step, "spec": _SPEC_PARTS[step](model), "upstream": upstream, **options})


def reusable(
    model: AutoGLMModel, step: str, workdir: Path, *, decode_tokens: int, output: Path | None
) -> StepResult | None:
    """The earlier result of ``step`` when it can be reused as it is, else None."""
    if step not in _SPEC_PARTS:
        return None
    digest = inputs_digest(model, step, workdir, decode_tokens=decode_tokens, output=output)
    return completed(workdir / step, digest)
