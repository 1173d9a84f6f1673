"""Content-addressed revisions: the identity of what the pipeline builds from a spec.

A re-applied or reformatted spec gets the same revision, so it never builds twice; a change to
targets, rollout or feedback does not rebuild the artifact.
"""

from __future__ import annotations

import hashlib
import json

from autoglm_api.spec import AutoGLMModelSpec

ARTIFACT_SPEC_PARTS = ("source", "compression", "calibration", "validation")
REVISION_LENGTH = 12


def artifact_revision(spec: AutoGLMModelSpec) -> str:
    """Content-addressed id of what the pipeline builds: the first 12 hex digits of a SHA-256.

    Hashes the canonical JSON (sorted keys, defaults filled in, unset optionals left out) of
    ``source``, ``compression``, ``calibration`` and ``validation``, so a re-applied or reformatted
    spec gets the same revision and a change to targets, rollout or feedback does not rebuild.
    """
    data = spec.to_json()
    parts = {key: data[key] for key in ARTIFACT_SPEC_PARTS if key in data}
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:REVISION_LENGTH]
