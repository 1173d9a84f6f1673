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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from autoglm_api.spec import AutoGLMModelSpec, Precision, Quantization, QuantizationMethod
from autoglm_core.digests import canonical_digest, short_id
from autoglm_core.revision import artifact_revision

INT8_METHODS: Final = ("int8-weight-only", "int8-dynamic", "smoothquant-w8a8")
_FIXED: Final[dict[str, QuantizationMethod]] = {"fp32": "none", "fp16": "fp16", "bf16": "bf16"}


@dataclass(frozen=True)
class Variant:
    """One artifact the pipeline builds: ``name`` is "" for the spec's own compression, else the
    precision (it suffixes the variant's step names: ``compress-int4``)."""

    name: str
    spec: AutoGLMModelSpec
    revision: str
    #: The targets served from it.
    targets: tuple[str, ...]


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
    (named "") when a target serves it, and one per other precision. A variant no target serves
    is not built, so its gates cannot reject the rollout."""
    own = artifact_revision(spec)
    found: dict[str, tuple[str, AutoGLMModelSpec, list[str]]] = {}
    for target in spec.targets:
        vspec = variant_spec(spec, target.precision)
        revision = artifact_revision(vspec)
        if revision not in found:
            found[revision] = ("" if revision == own else str(target.precision), vspec, [])
        found[revision][2].append(target.name)
    return tuple(Variant(name, vspec, rev, tuple(names)) for rev, (name, vspec, names) in found.items())


def target_revisions(spec: AutoGLMModelSpec) -> dict[str, str]:
    """Each target's revision: the variant of its precision."""
    return {target: v.revision for v in variants(spec) for target in v.targets}


def rollout_revision(spec: AutoGLMModelSpec) -> str:
    """The id of what a rollout puts on its targets: the spec's revision when every target serves
    the spec's own variant, else the digest of each target's revision, so that a change of one
    target's precision is a rollout of its own (the other targets' revisions are unchanged)."""
    own = artifact_revision(spec)
    revisions = target_revisions(spec)
    if all(r == own for r in revisions.values()):
        return own
    return short_id(canonical_digest({"targets": revisions}))


def variant_named(spec: AutoGLMModelSpec, name: str) -> Variant:
    """The variant ``name`` ("" for the spec's own); ValueError naming the ones there are."""
    for v in variants(spec):
        if v.name == name:
            return v
    known = ", ".join(repr(v.name) for v in variants(spec))
    raise ValueError(f"variant {name!r} is not one this spec builds; its variants: {known}")
