"""Whether a step can be skipped: its inputs' identity, computed without importing torch.

Kept apart from ``steps.py`` so that a step whose inputs are unchanged returns in well under a
second, instead of paying for the model libraries' import first.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autoglm_api.resource import AutoGLMModel
from autoglm_core.digests import canonical_digest, sha256_file
from autoglm_core.uris import SourceError, resolve
from autoglm_core.variants import variant_named
from autoglm_pipelines.dag import PER_VARIANT, baseline_publisher, pipeline_steps
from autoglm_pipelines.results import StepResult, completed, read_result, step_files


def _data(m: AutoGLMModel) -> dict[str, Any]:
    # What calibration_batches() reads: the calibration windows skip validation's tokens.
    return {"calibration": m.spec.calibration.to_json(), "validation": m.spec.validation.to_json()}


#: The part of the spec each step reads (the rest reaches it through its inputs' hashes).
_SPEC_PARTS: dict[str, Callable[[AutoGLMModel], Any]] = {
    "fetch": lambda m: m.spec.source.to_json(),
    "finetune": lambda m: {
        "training": m.spec.training.to_json() if m.spec.training is not None else None,
        **_data(m),
    },
    "search": lambda m: {"compression": m.spec.compression.to_json(), **_data(m)},
    "compress": lambda m: {"compression": m.spec.compression.to_json(), **_data(m)},
    # whether the Hessians are recorded depends on the rounding algorithm
    "calibrate": lambda m: {"algorithm": m.spec.compression.quantization.algorithm, **_data(m)},
    # a fine-tune is also judged against training.against's artifact (its URI: a revision's artifact never changes)
    "validate": lambda m: (
        m.spec.validation.to_json()
        if m.spec.training is None
        else {"validation": m.spec.validation.to_json(), "against": m.spec.training.against}
    ),
    "publish": lambda m: {"model": m.namespaced_name, "compression": m.spec.compression.to_json()},
}
#: Steps that read the datasets: their contents are part of the identity, not only their URIs.
_READS_DATA = {"finetune", "search", "compress", "calibrate", "validate"}


def inputs_digest(
    model: AutoGLMModel,
    step: str,
    workdir: Path,
    *,
    decode_tokens: int,
    output: Path | None,
    baseline: bool = False,
) -> str:
    """The identity of ``step``'s inputs (a step name: ``compress``, ``compress-int4``): its part of
    the spec (its variant's, for a variant's step) and the hashes of its inputs' files."""
    found = next((s for s in pipeline_steps(model.spec) if s.name == step), None)
    publishes_source = baseline and step == baseline_publisher(model.spec)
    kind = found.function if found is not None else step
    deps = found.depends if found is not None else ()
    engine = "auto"
    if found is not None and found.kind in PER_VARIANT:
        variant = variant_named(model.spec, found.variant)
        model, engine = model.model_copy(update={"spec": variant.spec}), variant.engine
    upstream = {dep: (r.files if (r := read_result(workdir / dep)) else None) for dep in deps}
    options: dict[str, Any] = {}
    if kind == "compress":  # the engine decides the format (a variant's name need not say it)
        options["engine"] = engine
        if engine == "auto":  # GGUF or not depends on llama.cpp being installed here
            options["llamaCpp"] = importlib.util.find_spec("llama_cpp") is not None
    if kind in ("validate", "search"):
        options = {"decodeTokens": decode_tokens}
    elif kind == "publish":
        options = {"output": str(output) if output else None}
        if publishes_source:
            options["baseline"] = True
    if kind in _READS_DATA:
        uris = {model.spec.calibration.dataset, model.spec.validation.dataset}
        options["datasets"] = {uri: _local_digest(uri) for uri in sorted(uris)}
    if kind == "finetune" and model.spec.training is not None:
        dataset = model.spec.training.dataset
        options["datasets"] = {**options.get("datasets", {}), dataset: _local_digest(dataset)}
    return canonical_digest({"step": step, "spec": _SPEC_PARTS[kind](model), "upstream": upstream, **options})


def _local_digest(uri: str) -> str | None:
    """SHA-256 of a dataset that lives on this machine (file, pkg, pvc), so editing it in place
    re-runs what read it; remote datasets are identified by their URI alone."""
    if not uri.startswith(("file://", "pkg://", "pvc://")):
        return None
    try:
        path = resolve(uri, cache_dir=Path("."))
    except SourceError:
        return None  # the step itself will report it
    return sha256_file(path) if path.is_file() else canonical_digest(step_files(path))


def reusable(
    model: AutoGLMModel,
    step: str,
    workdir: Path,
    *,
    decode_tokens: int,
    output: Path | None,
    baseline: bool = False,
) -> StepResult | None:
    """The earlier result of ``step`` when it can be reused as it is, else None.

    It can when it succeeded for the same inputs and every file it wrote still hashes as recorded,
    including a published artifact written outside the workdir (``--output``).
    """
    if not any(s.name == step for s in pipeline_steps(model.spec)):
        return None
    digest = inputs_digest(
        model, step, workdir, decode_tokens=decode_tokens, output=output, baseline=baseline
    )
    earlier = completed(workdir / step, digest)
    for folder, files in (("artifact", "artifactFiles"), ("baseline", "baselineFiles")):
        if earlier is not None and files in earlier.metrics:
            artifact = Path(str(earlier.metrics.get(folder, "")))
            if not artifact.is_dir() or step_files(artifact) != earlier.metrics[files]:
                return None
    return earlier
