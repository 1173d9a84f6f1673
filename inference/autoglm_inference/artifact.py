"""Model artifacts as the server loads them: resolve the URI, verify every hash, then load.

A URI names a model folder, or a GGUF file (converted once and cached as safetensors, as the
pipeline's fetch step does). A published artifact (``autoglm pipeline publish``) carries ``model-card.json`` listing the
SHA-256 of every file. The artifact's digest is the SHA-256 of that card, so one hash pins every
byte; a plain Hugging Face folder without a card is pinned by the digest of its file hashes.
Nothing here unpickles: weights are safetensors only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from autoglm_core.card import Artifact, ArtifactError, verify
from autoglm_core.uris import SourceError, resolve
from autoglm_modeling.folders import load_model_folder
from autoglm_modeling.loading import gguf_as_safetensors

__all__ = ["Artifact", "ArtifactError", "LoadedArtifact", "load", "locate", "verify"]


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
