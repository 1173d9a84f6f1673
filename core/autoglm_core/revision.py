"""Content-addressed revisions: the identity of what the pipeline builds from a spec.

A re-applied or reformatted spec gets the same revision, so it never builds twice; a change to
targets, rollout or feedback does not rebuild the artifact.
"""

from __future__ import annotations

from autoglm_api.spec import AutoGLMModelSpec
from autoglm_core.digests import canonical_digest, short_id

ARTIFACT_SPEC_PARTS = ("source", "training", "compression", "calibration", "validation")


def artifact_revision(spec: AutoGLMModelSpec) -> str:
    """Content-addressed id of what the pipeline builds: the first 12 hex digits of a SHA-256.

    Hashes the canonical JSON (sorted keys, defaults filled in, unset optionals left out) of
    ``source``, ``training`` (when set: a fine-tune, e.g. a retraining revision's), ``compression``,
    ``calibration`` and ``validation``, so a re-applied or reformatted
    spec gets the same revision and a change to targets, rollout or feedback does not rebuild.
    """
    data = spec.to_json()
    parts = {key: data[key] for key in ARTIFACT_SPEC_PARTS if key in data}
    return short_id(canonical_digest(parts))


#: The prefix of a source's revision: the uncompressed model served as the first canary's baseline.
SOURCE_PREFIX = "src-"


def source_revision(spec: AutoGLMModelSpec) -> str:
    """Content-addressed id of the uncompressed source as the pipeline fetched it (``src-`` and 12
    hex digits): the baseline a first rollout's candidate is canaried against."""
    return SOURCE_PREFIX + short_id(canonical_digest({"source": spec.to_json()["source"]}))
