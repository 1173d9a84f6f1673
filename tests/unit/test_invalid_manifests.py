"""Each invalid manifest is refused with the field path and a message that says what is allowed."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from jsonschema import Draft4Validator

from autoglm_api.crd import openapi_schema
from autoglm_api.structural import apply_defaults, check_rules
from autoglm_api.validation import format_path, prune_nulls, validate_document
from tests.conftest import load_example

Doc = dict[str, Any]
_MISSING = object()


def _walk(doc: Doc, path: str) -> tuple[Any, str | int]:
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    node: Any = doc
    for part in parts[:-1]:
        node = node[part]
    return node, parts[-1]


def put(path: str, value: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        node, last = _walk(doc, path)
        if value is _MISSING:
            del node[last]
        else:
            node[last] = value

    return mutate


def drop(path: str) -> Callable[[Doc], None]:
    return put(path, _MISSING)


def both(*mutations: Callable[[Doc], None]) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        for m in mutations:
            m(doc)

    return mutate


Q = "spec.compression.quantization"
P = "spec.compression.pruning"
D = "spec.compression.distillation"
R = "spec.rollout"
PO = "spec.feedback.promptOptimization"
T0 = "spec.targets[0]"

CASES: list[tuple[str, Callable[[Doc], None], str, str]] = [
    ("unknown-top-field", put("foo", 1), "foo", "unknown field"),
    ("api-version", put("apiVersion", "autoglm.io/v1"), "apiVersion", 'must be one of "autoglm.io/v1alpha1"'),
    ("kind", put("kind", "AutoGLMModels"), "kind", 'must be "AutoGLMModel"'),
    ("no-name", drop("metadata.name"), "metadata", "name (or generateName) is required"),
    ("name-not-dns", put("metadata.name", "Support_GLM"), "metadata.name", "DNS-1035 label"),
    ("name-too-long", put("metadata.name", "a" * 41), "metadata.name", "at most 40 characters"),
    ("metadata-typo", put("metadata.lables", {"a": "b"}), "metadata.lables", 'did you mean "labels"'),
    ("no-spec", drop("spec"), "spec", "required field is missing"),
    ("no-source", drop("spec.source"), "spec.source", "required field is missing"),
    ("no-uri", drop("spec.source.uri"), "spec.source.uri", "required field is missing"),
    ("uri-scheme", put("spec.source.uri", "ftp://host/m"), "spec.source.uri", "one of the schemes"),
    ("format", put("spec.source.format", "onnx"), "spec.source.format", '"huggingface", "gguf", "safetensors"'),
    ("gguf-uri", put("spec.source.format", "gguf"), "spec.source.uri", "names a .gguf file"),
    ("sha256", put("spec.source.sha256", "abc"), "spec.source.sha256", "64 lowercase hex"),
    ("quant-method", put(f"{Q}.method", "int3"), f"{Q}.method", '"int8-weight-only"'),
    ("metric-accuracy", put("spec.validation.metric", "accuracy"), "spec.validation.metric",
     "metric accuracy is not built yet: the only supported value is perplexity"),
    ("group-size-not-int4", put(f"{Q}.method", "int8-weight-only"), f"{Q}.groupSize", "only allowed with method int4-weight-only"),
    (
        "group-size-value",
        both(put(f"{Q}.method", "int4-weight-only"), put(f"{Q}.groupSize", 100)),
        f"{Q}.groupSize",
        "must be one of 32, 64, 128, 256, got 100",
    ),
    ("skip-modules-type", put(f"{Q}.skipModules", "lm_head"), f"{Q}.skipModules", "must be a list"),
    ("snake-case", put(f"{Q}.group_size", 64), f"{Q}.group_size", 'did you mean "groupSize"'),
    ("sparsity-max", put(f"{P}.sparsity", 0.95), f"{P}.sparsity", "less than or equal to 0.9"),
    ("sparsity-without-method", both(put(f"{P}.method", "none"), put(f"{P}.sparsity", 0.3)), f"{P}.sparsity",
     "must be 0 when method is none, got 0.3"),
    ("method-without-sparsity", put(f"{P}.sparsity", 0), f"{P}.sparsity",
     "greater than 0 with method structured-l1"),
    ("two-of-four", both(put(f"{P}.method", "semi-structured-2of4"), put(f"{P}.sparsity", 0.3)), f"{P}.sparsity",
     "sparsity must be 0.5, got 0.3"),
    ("prune-method", put(f"{P}.method", "random"), f"{P}.method", '"structured-l1"'),
    ("temperature-order", put(f"{D}.temperature", {"start": 1.0, "end": 5.0}), f"{D}.temperature",
     "start >= end > 0, got start 1 and end 5"),
    ("temperature-zero", put(f"{D}.temperature.end", 0), f"{D}.temperature.end", "must be greater than 0"),
    ("distill-steps", put(f"{D}.steps", 0), f"{D}.steps", "greater than or equal to 1, got 0"),
    ("student-layers-type", put(f"{D}.studentLayers", "two"), f"{D}.studentLayers", 'an integer, got string "two"'),
    ("tolerable-loss-zero", put("spec.compression.search.tolerableLoss", 0), "spec.compression.search.tolerableLoss",
     "must be greater than 0"),
    ("tolerable-loss-max", put("spec.compression.search.tolerableLoss", 0.6), "spec.compression.search.tolerableLoss",
     "less than or equal to 0.5"),
    ("max-trials", put("spec.compression.search.maxTrials", -1), "spec.compression.search.maxTrials",
     "greater than or equal to 1"),
    ("calibration-samples", put("spec.calibration.samples", 0), "spec.calibration.samples", "greater than or equal"),
    ("calibration-dataset", put("spec.calibration.dataset", "hamlet.txt"), "spec.calibration.dataset", "a URI"),
    ("metric", put("spec.validation.metric", "bleu"), "spec.validation.metric", '"perplexity", "accuracy"'),
    ("quality-gate", put("spec.validation.gates.maxQualityLoss", 1.5), "spec.validation.gates.maxQualityLoss",
     "less than or equal to 1"),
    ("size-gate", put("spec.validation.gates.minSizeReduction", 0.5), "spec.validation.gates.minSizeReduction",
     "greater than or equal to 1"),
    ("no-targets", put("spec.targets", []), "spec.targets", "at least 1 item"),
    ("targets-mapping", put("spec.targets", {"name": "cloud"}), "spec.targets", "must be a list"),
    ("duplicate-targets", put("spec.targets[1].name", "cloud"), "spec.targets", "target names must be unique"),
    ("target-name", put("spec.targets[1].name", "Edge_1"), "spec.targets[1].name", "DNS-1035 label"),
    ("target-name-long", put("spec.targets[1].name", "e" * 16), "spec.targets[1].name", "at most 15 characters"),
    ("pool", put(f"{T0}.pool", "aws"), f"{T0}.pool", '"cloud-gpu", "cloud-cpu", "kubeedge"'),
    ("gpu-pool-no-gpu", put(f"{T0}.resources.gpu", 0), f"{T0}.resources.gpu",
     "cloud-gpu targets must request resources.gpu >= 1, got 0"),
    ("gpu-pool-no-resources", drop(f"{T0}.resources"), f"{T0}.resources.gpu", "must request resources.gpu >= 1"),
    ("replicas-order", put(f"{T0}.replicas", {"min": 5, "max": 4}), f"{T0}.replicas.min",
     "less than or equal to max (4), got 5"),
    ("replicas-max", put(f"{T0}.replicas.max", 0), f"{T0}.replicas.max", "greater than or equal to 1"),
    ("precision", put(f"{T0}.precision", "int2"), f"{T0}.precision", '"int8", "int4"'),
    ("engine", put(f"{T0}.engine", "vllm"), f"{T0}.engine", '"auto", "torch", "llama.cpp"'),
    ("gpu-pool-llama-cpp", put(f"{T0}.engine", "llama.cpp"), f"{T0}.engine",
     "engine llama.cpp serves on CPU pools (cloud-cpu, kubeedge)"),
    ("memory", put(f"{T0}.resources.memory", "16 GB"), f"{T0}.resources.memory", "Kubernetes quantity"),
    ("node-selector-value", put(f"{T0}.nodeSelector", {"gpu": 1}), f"{T0}.nodeSelector[gpu]", "must be a string"),
    ("toleration-operator", put("spec.targets[1].tolerations[0].operator", "Maybe"),
     "spec.targets[1].tolerations[0].operator", '"Exists", "Equal"'),
    ("strategy", put(f"{R}.strategy", "bluegreen"), f"{R}.strategy", '"canary", "immediate"'),
    ("steps-order", put(f"{R}.steps", [{"weight": 10}, {"weight": 5}, {"weight": 100}]), f"{R}.steps",
     "strictly increasing, got [10, 5, 100]"),
    ("steps-repeat", put(f"{R}.steps", [{"weight": 50}, {"weight": 50}, {"weight": 100}]), f"{R}.steps",
     "strictly increasing"),
    ("steps-last", put(f"{R}.steps", [{"weight": 10}, {"weight": 50}]), f"{R}.steps",
     "last step must have weight 100, got 50"),
    ("step-zero", put(f"{R}.steps[0].weight", 0), f"{R}.steps[0].weight", "greater than or equal to 1, got 0"),
    ("step-over", put(f"{R}.steps[1].weight", 150), f"{R}.steps[1].weight", "less than or equal to 100, got 150"),
    ("step-weight-string", put(f"{R}.steps[0].weight", "10"), f"{R}.steps[0].weight", 'an integer, got string "10"'),
    ("pause", put(f"{R}.steps[0].pause", "5 minutes"), f"{R}.steps[0].pause", "a duration such as 30s"),
    ("immediate-steps", put(f"{R}.strategy", "immediate"), f"{R}.steps", "immediate takes no steps"),
    (
        "too-many-steps",
        put(f"{R}.steps", [{"weight": w} for w in range(1, 21)] + [{"weight": 100}]),
        f"{R}.steps",
        "at most 20 item(s), got 21",
    ),
    ("error-rate", put(f"{R}.analysis.maxErrorRate", 1.5), f"{R}.analysis.maxErrorRate", "less than or equal to 1"),
    ("feedback-score", put(f"{R}.analysis.minFeedbackScore", -0.1), f"{R}.analysis.minFeedbackScore",
     "greater than or equal to 0"),
    ("interval", put(f"{R}.analysis.interval", "1 minute"), f"{R}.analysis.interval", "a duration"),
    ("failure-limit", put(f"{R}.analysis.failureLimit", "two"), f"{R}.analysis.failureLimit", "an integer"),
    ("one-variant", put(f"{PO}.variants", [{"name": "a", "system": "x"}]), f"{PO}.variants",
     "at least 2 variants, got 1"),
    ("duplicate-variants", put(f"{PO}.variants[1].name", "concise"), f"{PO}.variants",
     "variant names must be unique, got [concise, concise]"),
    ("algorithm", put(f"{PO}.algorithm", "epsilon"), f"{PO}.algorithm", '"thompson", "ucb", "reinforce"'),
    ("variant-system", drop(f"{PO}.variants[0].system"), f"{PO}.variants[0].system", "required field is missing"),
    ("enabled-string", put(f"{PO}.enabled", "yes"), f"{PO}.enabled", "a boolean"),
    ("retrain-score", put("spec.feedback.retraining.feedbackScoreBelow", 2), "spec.feedback.retraining.feedbackScoreBelow",
     "less than or equal to 1"),
    ("drift", put("spec.feedback.retraining.driftAbove", -1), "spec.feedback.retraining.driftAbove",
     "greater than or equal to 0"),
    ("min-feedback", put("spec.feedback.retraining.minFeedback", 0), "spec.feedback.retraining.minFeedback",
     "greater than or equal to 1"),
    ("feedback-typo", put("spec.feedback.retrain", {}), "spec.feedback.retrain", 'did you mean "retraining"'),
]  # fmt: skip


def _mutated(mutate: Callable[[Doc], None]) -> Doc:
    doc = load_example("cloud-and-edge.yaml")
    mutate(doc)
    return doc


def test_there_are_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize(("mutate", "path", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_manifest_names_field_and_reason(
    mutate: Callable[[Doc], None], path: str, fragment: str
) -> None:
    result = validate_document(_mutated(mutate))
    assert not result.valid
    lines = [str(p) for p in result.problems]
    assert any(line.startswith(f"{path}: ") and fragment in line for line in lines), lines


CEL_CASES = [c for c in CASES if c[0] in {
    "gguf-uri", "group-size-not-int4", "sparsity-without-method", "method-without-sparsity", "two-of-four",
    "temperature-order", "duplicate-targets", "gpu-pool-no-gpu", "gpu-pool-llama-cpp", "gpu-pool-no-resources", "replicas-order",
    "steps-order", "steps-repeat", "steps-last", "immediate-steps", "one-variant",
    "duplicate-variants", "name-not-dns", "metric-accuracy",
}]  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "path", "fragment"), [c[1:] for c in CEL_CASES], ids=[c[0] for c in CEL_CASES]
)
def test_committed_crd_rules_reject_the_same_way(
    mutate: Callable[[Doc], None], path: str, fragment: str
) -> None:
    """The CRD's own CEL rules, evaluated as the API server does, give the same path and message."""
    schema = openapi_schema()
    defaulted = apply_defaults(_mutated(mutate), schema)
    failures = check_rules(defaulted, schema)
    cli = [(p.path, p.message) for p in validate_document(_mutated(mutate)).problems]
    assert any(p == path and fragment in m for p, m in failures), failures
    assert [f for f in failures if f[0] == path] == [c for c in cli if c[0] == path]


def _strict(node: dict[str, Any], path: str = "") -> dict[str, Any]:
    """The CRD schema with kubectl's strict field validation: unknown fields are errors."""
    out = dict(node)
    if "properties" in out and path != ".metadata":
        out["additionalProperties"] = False
        out["properties"] = {k: _strict(v, f"{path}.{k}") for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"], f"{path}[]")
    return out


def _schema_error_paths(doc: Doc) -> set[str]:
    schema = openapi_schema()
    paths = set()
    for error in Draft4Validator(_strict(schema)).iter_errors(apply_defaults(doc, schema)):
        base = list(error.absolute_path)
        if error.validator == "required":
            paths |= {format_path([*base, n]) for n in error.validator_value if n not in error.instance}
        elif error.validator == "additionalProperties":
            paths |= {format_path([*base, n]) for n in set(error.instance) - set(error.schema["properties"])}
        else:
            paths.add(format_path(base))
    return paths


# The API server checks these natively (ObjectMeta, apiVersion, kind), not through the CRD schema.
_NOT_IN_SCHEMA = {"api-version", "kind", "no-name", "metadata-typo", "name-too-long"}
SCHEMA_CASES = [c for c in CASES if c not in CEL_CASES and c[0] not in _NOT_IN_SCHEMA]


@pytest.mark.parametrize(("mutate", "path"), [c[1:3] for c in SCHEMA_CASES], ids=[c[0] for c in SCHEMA_CASES])
def test_committed_crd_schema_flags_the_same_field(mutate: Callable[[Doc], None], path: str) -> None:
    """The rendered openAPIV3Schema (as a JSON Schema validator reads it) rejects the same field."""
    assert path in _schema_error_paths(_mutated(mutate))


@pytest.mark.parametrize("name", ["autoglm-model.yaml", "cloud-and-edge.yaml"])
def test_committed_crd_schema_accepts_the_examples(name: str) -> None:
    assert _schema_error_paths(prune_nulls(load_example(name))) == set()
