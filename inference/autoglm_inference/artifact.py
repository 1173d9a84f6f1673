"""Model artifacts as the server loads them: resolve the URI, verify every hash, then load.

A URI names a model folder, or a GGUF file (converted once and cached as safetensors, as the
pipeline's fetch step does). A published artifact (``autoglm pipeline publish``) carries ``model-card.json`` listing the
SHA-256 of every file. The artifact's digest is the SHA-256 of that card, so one hash pins every
byte; a plain Hugging Face folder without a card is pinned by the digest of its file hashes.
Nothing here unpickles: weights are safetensors only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from autoglm_pipelines.artifacts import MODEL_CARD, load_model_folder
from autoglm_pipelines.loading import gguf_as_safetensors
from autoglm_pipelines.results import hash_tree
from autoglm_pipelines.uris import SourceError, resolve

REVISION_LENGTH = 12


class ArtifactError(Exception):
    """An artifact that cannot be served; ``status`` 409 for a digest mismatch, 422 when unusable."""

    def __init__(self, message: str, *, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Artifact:
    uri: str
    folder: Path
    digest: str
    revision: str
    card: dict[str, Any] | None


@dataclass
class LoadedArtifact:
    artifact: Artifact
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def locate(uri: str, *, cache_dir: Path) -> Path:
    """The local folder of ``uri``; a bare path counts as ``file://``."""
    if "://" not in uri:
        uri = "file://" + str(Path(uri).resolve())
    try:
        folder = resolve(uri, cache_dir=cache_dir)
        if folder.is_file() and folder.suffix == ".gguf":  # converted once, cached as safetensors
            folder = gguf_as_safetensors(folder, cache_dir=cache_dir)
    except SourceError as exc:
        raise ArtifactError(str(exc)) from exc
    if not folder.is_dir():
        raise ArtifactError(f"{uri}: not a model folder (expected config.json, tokenizer and safetensors)")
    return folder


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
        revision = str(card.get("revision") or digest[:REVISION_LENGTH])
    else:
        tree = json.dumps(hash_tree(folder), sort_keys=True).encode()
        digest = hashlib.sha256(tree).hexdigest()
        if expected_sha256 and expected_sha256.lower() != digest:
            raise ArtifactError(
                f"{uri}: no {MODEL_CARD}; the digest of its files is {digest}, not the requested {expected_sha256}",
                status=409,
            )
        revision = digest[:REVISION_LENGTH]
    return Artifact(uri=uri, folder=folder, digest=digest, revision=revision, card=card)


def load(uri: str, *, cache_dir: Path, expected_sha256: str | None = None) -> LoadedArtifact:
    """Resolve, verify and load ``uri``; raises ``ArtifactError`` naming what is wrong."""
    folder = locate(uri, cache_dir=cache_dir)
    artifact = verify(uri, folder, expected_sha256)
    try:
        model, tokenizer, _ = load_model_folder(folder)
    except SourceError as exc:
        raise ArtifactError(str(exc)) from exc
    except Exception as exc:  # safetensors, transformers and torch each raise their own kinds
        raise ArtifactError(f"{uri}: cannot load the model: {type(exc).__name__}: {exc}") from exc
    return LoadedArtifact(artifact, model, tokenizer)
