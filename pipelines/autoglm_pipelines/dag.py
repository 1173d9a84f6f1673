"""The pipeline's steps and their order: one definition for the Argo WorkflowTemplate and the local runner.

A spec with ``training`` adds ``finetune`` after fetch: the fine-tuned source is what calibrate,
search and compress read, validate compares it (compressed) with fetch's source, and publish lists
it in the lineage.

Pure: no I/O. Every step runs as ``autoglm pipeline STEP --spec SPEC --workdir DIR``, reads what
the steps it depends on wrote under ``DIR/<step>/`` and writes its own outputs and ``STEP.json``
under ``DIR/<step>/``. In Argo each step's folder is an output artifact, handed to the steps
that depend on it as an input artifact at the same path.

One run builds every variant the targets ask for (``autoglm_core.variants``): fetch, calibrate and
the search once, then compress, validate and publish per variant. The spec's own variant keeps the
plain step names; another's are suffixed with its name, its precision (``compress-int4``,
``publish-bf16``) and, where one precision is built for two engines, the engine
(``compress-int8-gguf``), and run as ``autoglm pipeline compress --variant int4``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from autoglm_api.spec import AutoGLMModelSpec
from autoglm_core.variants import variants

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
    #: The variant a per-variant step builds ("" for the spec's own, and for the shared steps).
    variant: str = ""
    #: The step's function (``compress`` for ``compress-int4``); the name when left empty.
    kind: str = ""

    @property
    def function(self) -> str:
        return self.kind or self.name


FETCH = Step(
    "fetch", "Resolve spec.source.uri and load the checkpoint as safetensors", depends=(), memory="4Gi"
)
FINETUNE = Step(
    "finetune",
    "Fine-tune the source on spec.training's conversations (LoRA, merged into the weights)",
    depends=("fetch",),
    retries=1,
    timeout_seconds=6 * 3600,
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


SHARED: tuple[str, ...] = ("fetch", "finetune", "calibrate", "search")
PER_VARIANT: tuple[str, ...] = ("compress", "validate", "publish")


def step_name(kind: str, variant: str) -> str:
    """The folder and task name of step ``kind`` of ``variant``: ``compress``, ``compress-int4``."""
    return f"{kind}-{variant}" if variant and kind in PER_VARIANT else kind


def pipeline_steps(spec: AutoGLMModelSpec) -> tuple[Step, ...]:
    """The steps ``spec`` needs, in an order where every step comes after its dependencies."""
    built = variants(spec)
    searched = any(v.spec.compression.search.enabled for v in built)
    # A fine-tuned source: what every later step reads as "the model" is finetune's, not fetch's.
    tuned = ("finetune",) if spec.training is not None else ()
    steps = [FETCH, *([FINETUNE] if tuned else [])]
    steps += [
        dataclasses.replace(s, depends=(*s.depends, *tuned))
        for s in (CALIBRATE, *([SEARCH] if searched else []))
    ]
    for variant in built:
        search = ("search",) if variant.spec.compression.search.enabled else ()
        for base, extra in ((COMPRESS, (*search, *tuned)), (VALIDATE, tuned), (PUBLISH, (*search, *tuned))):
            steps.append(
                dataclasses.replace(
                    base,
                    name=step_name(base.name, variant.name),
                    depends=tuple(step_name(d, variant.name) for d in (*base.depends, *extra)),
                    variant=variant.name,
                    kind=base.name,
                )
            )
    return tuple(steps)


def baseline_publisher(spec: AutoGLMModelSpec) -> str:
    """The publish step that also publishes the source, when asked for (the first variant's): the
    source is one for every variant, so it is published once."""
    return step_name("publish", variants(spec)[0].name)


def find_step(spec: AutoGLMModelSpec, name: str) -> Step:
    """The step called ``name`` (``compress-int4``); ValueError naming the steps there are."""
    for step in pipeline_steps(spec):
        if step.name == name:
            return step
    raise ValueError(
        f"no step {name!r} in this pipeline; its steps: {', '.join(s.name for s in pipeline_steps(spec))}"
    )
