"""The pipeline's steps and their order: one definition for the Argo WorkflowTemplate and the local runner.

Pure: no I/O. Every step runs as ``autoglm pipeline STEP --spec SPEC --workdir DIR``, reads what
the steps it depends on wrote under ``DIR/<step>/`` and writes its own outputs and ``STEP.json``
under ``DIR/<step>/``. In Argo each step's folder is an output artifact, handed to the steps
that depend on it as an input artifact at the same path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from autoglm_api.spec import AutoGLMModelSpec

#: Exit status of a step whose failure a retry may fix (EX_TEMPFAIL, e.g. a failed download); any
#: other non-zero status is a verdict. The Argo retry strategy retries exactly these.
EXIT_TRANSIENT = 75


@dataclass(frozen=True)
class Step:
    """One pipeline step: a process that turns its inputs' folders into its own folder."""

    name: str
    description: str
    depends: tuple[str, ...]
    #: Requests for the step's container; memory scales with the model in practice.
    cpu: str = "2"
    memory: str = "8Gi"
    gpu: int = 0
    #: Retries (with exponential backoff) for transient failures such as a failed download.
    retries: int = 2
    timeout_seconds: int = 3600


FETCH = Step(
    "fetch", "Resolve spec.source.uri and load the checkpoint as safetensors", depends=(), memory="4Gi"
)
CALIBRATE = Step(
    "calibrate",
    "Run calibration data through the source model; record the activation statistics compression uses",
    depends=("fetch",),
    retries=1,
)
SEARCH = Step(
    "search",
    "Accuracy-budget search over compression settings (Optuna TPE)",
    depends=("fetch", "calibrate"),
    timeout_seconds=6 * 3600,
)
COMPRESS = Step(
    "compress",
    "Prune, distil and quantize as spec.compression says, with calibrate's statistics",
    depends=("fetch", "calibrate"),
)
VALIDATE = Step(
    "validate",
    "Measure baseline and candidate side by side and apply the validation gates",
    depends=("fetch", "compress"),
    retries=0,  # a failed gate is a verdict, not a transient failure
)
# Publish reads every folder: the weights and the lineage (each step's STEP.json) go in the model card.
PUBLISH = Step(
    "publish",
    "Write the validated artifact and its model card",
    depends=("fetch", "calibrate", "compress", "validate"),
    memory="4Gi",
)


def pipeline_steps(spec: AutoGLMModelSpec) -> tuple[Step, ...]:
    """The steps ``spec`` needs, in an order where every step comes after its dependencies."""
    if spec.compression.search.enabled:
        compress = dataclasses.replace(COMPRESS, depends=(*COMPRESS.depends, "search"))
        publish = dataclasses.replace(PUBLISH, depends=(*PUBLISH.depends, "search"))
        return (FETCH, CALIBRATE, SEARCH, compress, VALIDATE, publish)
    return (FETCH, CALIBRATE, COMPRESS, VALIDATE, PUBLISH)
