"""The model card: a published artifact's lineage, metrics and the SHA-256 of every other file.

The artifact's digest is the SHA-256 of its card, so one hash pins every byte; a plain Hugging Face
folder without a card is pinned by the digest of its file hashes. Checked before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from autoglm_core.digests import canonical_digest, hash_tree, short_id
from autoglm_core.errors import AutoGLMError

MODEL_CARD: Final = "model-card.json"


class ArtifactError(AutoGLMError):
    """An artifact that cannot be served: 409 for a digest mismatch, 422 when unusable."""

    default_status = 422


@dataclass(frozen=True)
class Artifact:
    uri: str
    folder: Path
    digest: str
    revision: str
    card: dict[str, Any] | None


def write_model_card(folder: Path, card: dict[str, Any]) -> str:
    """Write ``card`` into ``folder`` with ``files`` (the SHA-256 of every other file) filled in.

    Returns the card's own SHA-256: the artifact digest, which pins every file through the card.
    """
    files = hash_tree(folder, exclude={MODEL_CARD})
    raw = json.dumps({**card, "files": files}, indent=2, default=str).encode("utf-8")
    (folder / MODEL_CARD).write_bytes(raw)
    return hashlib.sha256(raw).hexdigest()


def verify(uri: str, folder: Path, expected_sha256: str | None = None) -> Artifact:
    """Check the folder against its model card (and the card against ``expected_sha256``)."""
    card_file = folder / MODEL_CARD
    card: dict[str, Any] | None = None
    if card_file.is_file():
        raw = card_file.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if expected_sha256 and expected_sha256.lower() != digest:
            raise ArtifactError(
                f"{uri}: sha256 {digest} of {MODEL_CARD} does not match the requested {expected_sha256}",
                status=409,
            )
        try:
            card = json.loads(raw)
            files = dict(card["files"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{uri}: {MODEL_CARD} is not a valid model card: {exc}") from exc
        actual = hash_tree(folder)
        unlisted = sorted(set(actual) - set(files) - {MODEL_CARD})
        if unlisted:  # it would be loaded (a chat template, a generation config) without being pinned
            raise ArtifactError(
                f"{uri}: {', '.join(unlisted)} not listed in {MODEL_CARD}; refusing unverified files"
            )
        for name, sha in sorted(files.items()):
            if name == MODEL_CARD:
                continue  # a card cannot hash itself
            if name not in actual:
                raise ArtifactError(f"{uri}: {name} is listed in {MODEL_CARD} but missing")
            if actual[name] != sha:
                raise ArtifactError(f"{uri}: {name} has sha256 {actual[name]}, the model card says {sha}")
        revision = str(card.get("revision") or short_id(digest))
    else:
        digest = canonical_digest(hash_tree(folder))
        if expected_sha256 and expected_sha256.lower() != digest:
            raise ArtifactError(
                f"{uri}: no {MODEL_CARD}; the digest of its files is {digest}, not the requested {expected_sha256}",
                status=409,
            )
        revision = short_id(digest)
    return Artifact(uri=uri, folder=folder, digest=digest, revision=revision, card=card)
