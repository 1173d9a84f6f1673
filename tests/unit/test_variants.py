"""The variants a spec's targets ask for: one per distinct compression, each a valid spec of its own."""

from __future__ import annotations

from typing import Any

import pytest

from autoglm_api.spec import AutoGLMModelSpec
from autoglm_core.revision import artifact_revision
from autoglm_core.variants import rollout_revision, target_revisions, variant_named, variant_spec, variants


def spec(
    method: str = "int8-weight-only", *precisions: str | None, search: bool = False, **quantization: Any
) -> AutoGLMModelSpec:
    targets = [
        {"name": f"t{i}", **({"precision": p} if p else {})} for i, p in enumerate(precisions or [None])
    ]
    return AutoGLMModelSpec.model_validate({
        "source": {"uri": "file:///m"},
        "compression": {"quantization": {"method": method, **quantization},
                        "search": {"enabled": search, "maxTrials": 4}},
        "targets": targets,
    })  # fmt: skip


@pytest.mark.parametrize(
    ("own", "precision", "method"),
    [
        ("int8-weight-only", "fp32", "none"),
        ("int8-weight-only", "bf16", "bf16"),
        ("int8-weight-only", "fp16", "fp16"),
        ("smoothquant-w8a8", "int8", "smoothquant-w8a8"),  # the spec's own 8-bit method is kept
        ("int4-weight-only", "int8", "int8-weight-only"),
        ("int8-dynamic", "int4", "int4-weight-only"),
    ],
)
def test_a_precision_overrides_only_the_quantization_method(own: str, precision: str, method: str) -> None:
    base = spec(own, None, precision, search=True)
    got = variant_spec(base, precision)  # type: ignore[arg-type]
    assert got.compression.quantization.method == method
    assert got.compression.pruning == base.compression.pruning
    AutoGLMModelSpec.model_validate(got.to_json())  # a valid spec (the CEL rules hold)
    assert not got.compression.search.enabled  # the target fixed the precision: nothing to search
    assert artifact_revision(got) != artifact_revision(base)


def test_the_spec_own_int4_keeps_its_group_size_and_algorithm() -> None:
    base = spec("int4-weight-only", "int4", groupSize=128, algorithm="gptq")
    assert variant_spec(base, "int4") is base
    assert [v.name for v in variants(base)] == [""]


def test_targets_that_ask_for_the_same_build_share_one_variant() -> None:
    base = spec("int8-weight-only", None, "int8", "int4", "bf16", "int4")
    found = variants(base)
    assert [(v.name, v.targets) for v in found] == [
        ("", ("t0", "t1")),
        ("int4", ("t2", "t4")),
        ("bf16", ("t3",)),
    ]
    revisions = target_revisions(base)
    assert revisions["t0"] == revisions["t1"] == artifact_revision(base)
    assert len(set(revisions.values())) == 3
    assert variant_named(base, "int4").revision == revisions["t2"]
    with pytest.raises(ValueError, match="its variants: '', 'int4', 'bf16'"):
        variant_named(base, "fp16")


def test_a_target_change_of_precision_changes_only_that_targets_revision() -> None:
    before = target_revisions(spec("int8-weight-only", None, "int4"))
    after = target_revisions(spec("int8-weight-only", None, "bf16"))
    assert before["t0"] == after["t0"]
    assert before["t1"] != after["t1"]


def test_a_searched_spec_gives_a_target_that_names_its_precision_an_unsearched_build() -> None:
    """The search may end at int4; a target that asked for int8 must get int8."""
    base = spec("int8-weight-only", None, "int8", search=True)
    own, fixed = variants(base)
    assert (own.name, own.targets, own.spec.compression.search.enabled) == ("", ("t0",), True)
    assert (fixed.name, fixed.targets, fixed.spec.compression.search.enabled) == ("int8", ("t1",), False)
    assert fixed.spec.compression.quantization.method == "int8-weight-only"


def test_a_variant_no_target_serves_is_not_built() -> None:
    """int4 is the spec's own, but the only target asks for bf16: int4's gates must not decide."""
    base = spec("int4-weight-only", "bf16")
    (only,) = variants(base)
    assert (only.name, only.targets) == ("bf16", ("t0",))
    assert rollout_revision(base) != artifact_revision(base)


def engines(*targets: dict[str, Any]) -> AutoGLMModelSpec:
    return AutoGLMModelSpec.model_validate({"source": {"uri": "file:///m"}, "targets": list(targets)})


def test_a_cpu_target_left_on_auto_keeps_the_revision_of_the_spec() -> None:
    base = engines({"name": "edge", "pool": "kubeedge"}, {"name": "cpu"})
    (only,) = variants(base)
    assert (only.name, only.engine, only.targets) == ("", "auto", ("edge", "cpu"))
    assert only.revision == artifact_revision(base) == rollout_revision(base)


def test_the_engine_splits_builds_and_names_them_where_a_precision_has_two() -> None:
    """A GPU target builds for torch, a target that asks for llama.cpp for GGUF: the spec's own
    compression on three engines is three revisions, named after the engine where they would
    share a name; int4 is built once, on llama.cpp, and keeps its plain name."""
    base = engines(
        {"name": "gpu", "pool": "cloud-gpu", "resources": {"gpu": 1}},
        {"name": "cpu"},
        {"name": "edge", "pool": "kubeedge", "engine": "llama.cpp"},
        {"name": "edge2", "pool": "kubeedge", "engine": "llama.cpp", "precision": "int4"},
        {"name": "torchcpu", "engine": "torch"},
    )
    found = {v.name: (v.engine, v.targets) for v in variants(base)}
    assert found == {
        "torch": ("torch", ("gpu", "torchcpu")),
        "": ("auto", ("cpu",)),
        "gguf": ("llama.cpp", ("edge",)),
        "int4": ("llama.cpp", ("edge2",)),
    }
    revisions = target_revisions(base)
    assert len({revisions[t] for t in ("gpu", "cpu", "edge", "edge2")}) == 4
    assert revisions["cpu"] == artifact_revision(base)
    # the same spec and engine, the same revision: a re-applied spec never builds twice
    assert target_revisions(AutoGLMModelSpec.model_validate(base.to_json())) == revisions


def test_a_spec_served_on_gpus_alone_keeps_the_plain_step_names() -> None:
    """Its own build is torch's: named "", so `autoglm pipeline compress` and the workflow's
    published-model need no variant, though its revision says torch."""
    base = engines({"name": "gpu", "pool": "cloud-gpu", "resources": {"gpu": 1}})
    (only,) = variants(base)
    assert (only.name, only.engine) == ("", "torch")
    assert only.revision != artifact_revision(base)
    assert rollout_revision(base) == only.revision  # one build: the rollout is that build
