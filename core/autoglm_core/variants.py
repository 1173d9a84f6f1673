"""The variants one pipeline run publishes: the spec's own compression, and one per other precision
its targets ask for (``targets[].precision``), each with its own content-addressed revision.

Pure. A precision overrides the quantization method and keeps everything else of the spec's
compression (pruning, distillation, skipped modules):

- ``fp32``: no quantization; ``fp16`` / ``bf16``: weights cast;
- ``int8``: the spec's method when it is an 8-bit one, else int8 weight-only;
- ``int4``: the spec's method (with its group size and rounding algorithm) when it is int4
  weight-only, else int4 weight-only with its defaults.

The search (``compression.search``) tunes only the spec's own variant: a target that names a
precision gets it unsearched. A precision that comes out the same as the spec's own compression is
that variant (one revision, one build). Only the variants some target serves are built.

The engine is part of a variant (``Variant.engine``): ``llama.cpp`` (a target asks for it: GGUF),
``torch`` (a target asks for it, or serves on cloud-gpu: safetensors) or ``auto`` (a CPU pool's
target left it to the pipeline: GGUF where the pipeline can make one, else safetensors). Targets
that differ in it never share a build: an ``auto`` variant keeps the revision it had before engines
were chosen, the others' revisions hash the engine in. A variant is named after its precision
("" for the spec's own compression); where two variants of one spec would share a name, the one
whose engine is not ``auto`` says it (``int8-gguf``, ``torch``: a GPU target's build of the spec's
own compression beside a CPU target's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from autoglm_api.spec import CPU_POOLS, AutoGLMModelSpec, Precision, Quantization, QuantizationMethod, Target
from autoglm_core.digests import canonical_digest, short_id
from autoglm_core.revision import artifact_revision

INT8_METHODS: Final = ("int8-weight-only", "int8-dynamic", "smoothquant-w8a8")
_FIXED: Final[dict[str, QuantizationMethod]] = {"fp32": "none", "fp16": "fp16", "bf16": "bf16"}
#: What a variant's name says of its engine (an ``auto`` variant's name says nothing).
_ENGINE_SUFFIX: Final = {"auto": "", "torch": "torch", "llama.cpp": "gguf"}


@dataclass(frozen=True)
class Variant:
    """One artifact the pipeline builds: ``name`` is "" for the spec's own compression, else the
    precision, with the engine where two builds of one precision differ in it (it suffixes the
    variant's step names: ``compress-int4``, ``compress-int8-gguf``)."""

    name: str
    spec: AutoGLMModelSpec
    revision: str
    #: The targets served from it.
    targets: tuple[str, ...]
    #: ``torch``, ``llama.cpp`` or ``auto`` (see the module's docstring): what format publish writes.
    engine: str = "auto"


def target_engine(target: Target) -> str:
    """The engine a target's variant is built for: its own choice, torch on GPU nodes, else auto."""
    if target.engine != "auto":
        return target.engine
    return "auto" if target.pool in CPU_POOLS else "torch"


def precision_method(spec: AutoGLMModelSpec, precision: Precision) -> QuantizationMethod:
    method = spec.compression.quantization.method
    if precision in _FIXED:
        return _FIXED[precision]
    if precision == "int8":
        return method if method in INT8_METHODS else "int8-weight-only"
    return "int4-weight-only"


def variant_spec(spec: AutoGLMModelSpec, precision: Precision | None) -> AutoGLMModelSpec:
    """``spec`` with its compression for ``precision`` (None: the spec as it is)."""
    if precision is None:
        return spec
    own = spec.compression.quantization
    method = precision_method(spec, precision)
    if method == own.method and not spec.compression.search.enabled:
        return spec
    # A searched spec may end at another method: a target that names a precision gets it unsearched.
    quantization = own if method == own.method else Quantization(method=method, skip_modules=own.skip_modules)
    search = spec.compression.search.model_copy(update={"enabled": False})
    compression = spec.compression.model_copy(update={"quantization": quantization, "search": search})
    return spec.model_copy(update={"compression": compression})


def variants(spec: AutoGLMModelSpec) -> tuple[Variant, ...]:
    """One per distinct build the targets ask for, in the order of the targets: the spec's own
    (named "") when a target serves it, and one per other precision and engine. A variant no
    target serves is not built, so its gates cannot reject the rollout."""
    own = artifact_revision(spec)
    found: dict[str, tuple[str, AutoGLMModelSpec, list[str], str]] = {}
    for target in spec.targets:
        vspec = variant_spec(spec, target.precision)
        engine = target_engine(target)
        built = artifact_revision(vspec)
        revision = built
        if engine != "auto":
            revision = short_id(canonical_digest({"artifact": built, "engine": engine}))
        if revision not in found:
            found[revision] = ("" if built == own else str(target.precision), vspec, [], engine)
        found[revision][2].append(target.name)
    bases = [base for base, _, _, _ in found.values()]
    named = []
    for rev, (base, vspec, names, engine) in found.items():
        name = base
        if bases.count(base) > 1 and engine != "auto":  # the same precision on two engines
            name = "-".join(part for part in (base, _ENGINE_SUFFIX[engine]) if part)
        named.append(Variant(name, vspec, rev, tuple(names), engine))
    return tuple(named)


def target_revisions(spec: AutoGLMModelSpec) -> dict[str, str]:
    """Each target's revision: the variant of its precision."""
    return {target: v.revision for v in variants(spec) for target in v.targets}


def rollout_revision(spec: AutoGLMModelSpec) -> str:
    """The id of what a rollout puts on its targets: that build's revision when every target serves
    one build (the spec's own revision, for the spec's own variant on ``auto``), else the digest of
    each target's revision, so that a change of one target's precision is a rollout of its own (the
    other targets' revisions are unchanged)."""
    revisions = target_revisions(spec)
    if len(set(revisions.values())) == 1:
        return next(iter(revisions.values()))
    return short_id(canonical_digest({"targets": revisions}))


def variant_named(spec: AutoGLMModelSpec, name: str) -> Variant:
    """The variant ``name`` ("" for the spec's own); ValueError naming the ones there are."""
    for v in variants(spec):
        if v.name == name:
            return v
    known = ", ".join(repr(v.name) for v in variants(spec))
    raise ValueError(f"variant {name!r} is not one this spec builds; its variants: {known}")
