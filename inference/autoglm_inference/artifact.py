"""Model artifacts as the server loads them: resolve the URI, verify every hash, then load.

A URI names a model folder, or a GGUF file. A published artifact (``autoglm pipeline publish``)
carries ``model-card.json`` listing the SHA-256 of every file. The artifact's digest is the SHA-256
of that card, so one hash pins every byte; a plain Hugging Face folder without a card is pinned by
the digest of its file hashes. Nothing here unpickles: weights are safetensors or GGUF only.

Which runtime serves an artifact (``choose_engine``): GGUF weights (a ``.gguf`` file, or a folder
whose weights are one ``.gguf`` file, as the pipeline publishes for a llama.cpp target) go to
llama.cpp on a CPU when it is installed; everything else, and anything on a GPU, to torch. A GGUF
served by torch is converted once and cached as safetensors, as the pipeline's fetch step does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from autoglm_core.card import Artifact, ArtifactError, verify
from autoglm_core.digests import sha256_file, short_id
from autoglm_core.uris import SourceError, resolve
from autoglm_inference.options import EngineChoice
from autoglm_inference.runtime import EngineKind
from autoglm_modeling.folders import gguf_weights_file, load_model_folder
from autoglm_modeling.gguf_export import llama_cpp_available
from autoglm_modeling.loading import TRANSFORMERS_LOCK, gguf_as_safetensors

__all__ = [
    "Artifact", "ArtifactError", "GGUFModel", "LoadedArtifact", "choose_engine", "gguf_weights", "load",
    "locate", "verify",
]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass
class GGUFModel:
    """What the server reads of a model llama.cpp serves: its config (context length) and
    generation config (end-of-turn ids); the weights stay in the GGUF file."""

    path: Path
    config: Any
    generation_config: Any


@dataclass
class LoadedArtifact:
    artifact: Artifact
    model: Any  # a transformers PreTrainedModel (torch), or a GGUFModel (llama.cpp)
    tokenizer: PreTrainedTokenizerBase
    engine: EngineKind = "torch"


def locate(uri: str, *, cache_dir: Path) -> Path:
    """The local folder (or GGUF file) of ``uri``; a bare path counts as ``file://``."""
    if "://" not in uri:
        uri = "file://" + str(Path(uri).resolve())
    try:
        found = resolve(uri, cache_dir=cache_dir)
    except SourceError as exc:
        raise ArtifactError(str(exc)) from exc
    if found.is_file() and found.suffix == ".gguf":
        return found
    if not found.is_dir():
        raise ArtifactError(
            f"{uri}: not a model folder (expected config.json, tokenizer and safetensors or GGUF)"
        )
    return found


def gguf_weights(found: Path) -> Path | None:
    """The GGUF file holding the weights of ``found`` (a .gguf file, or a folder of one and no safetensors)."""
    if found.is_file():
        return found if found.suffix == ".gguf" else None
    return gguf_weights_file(found)


def choose_engine(found: Path, requested: EngineChoice, *, device: str = "cpu") -> EngineKind:
    """The runtime for ``found``: as requested, or (``auto``) llama.cpp for GGUF weights on a CPU
    when llama-cpp-python is installed, else torch. Raises ``ArtifactError`` for a request that
    cannot be met, naming what is allowed."""
    gguf = gguf_weights(found)
    if requested == "torch":
        return "torch"
    if requested == "llama.cpp":
        if gguf is None:
            raise ArtifactError(
                f"{found}: --engine llama.cpp serves GGUF weights; this artifact has none (publish a GGUF variant "
                "for this target, or use --engine torch)"
            )
        if device != "cpu":
            raise ArtifactError(
                f"--engine llama.cpp runs on the CPU here; --device is {device} (use --engine torch)"
            )
        if not llama_cpp_available():
            raise ArtifactError(
                "--engine llama.cpp needs llama-cpp-python: `make install-llamacpp` (or --engine torch)"
            )
        return "llama.cpp"
    if gguf is not None and device == "cpu" and llama_cpp_available():
        return "llama.cpp"
    if gguf is not None:
        why = "llama-cpp-python is not installed" if device == "cpu" else f"the device is {device}"
        log.info("%s: GGUF weights served by torch (converted once): %s", found, why)
    return "torch"


def load(
    uri: str,
    *,
    cache_dir: Path,
    expected_sha256: str | None = None,
    engine: EngineChoice = "auto",
    device: str = "cpu",
) -> LoadedArtifact:
    """Resolve, verify and load ``uri``; raises ``ArtifactError`` naming what is wrong."""
    found = locate(uri, cache_dir=cache_dir)
    kind = choose_engine(found, engine, device=device)
    gguf = gguf_weights(found)
    try:
        if found.is_file() and kind == "torch":  # a bare GGUF for torch: its safetensors conversion
            found = gguf_as_safetensors(found, cache_dir=cache_dir)
            gguf = None
        artifact = (
            _verify_gguf_file(uri, found, expected_sha256)
            if found.is_file()
            else verify(uri, found, expected_sha256)
        )
        if kind == "llama.cpp":
            assert gguf is not None
            described, tokenizer = _gguf_model(gguf)
            return LoadedArtifact(artifact, described, tokenizer, "llama.cpp")
        # torch serves a published GGUF folder through its safetensors conversion
        torch_folder = gguf_as_safetensors(gguf, cache_dir=cache_dir) if gguf is not None else found
        model, tokenizer, _ = load_model_folder(torch_folder)
    except ArtifactError:
        raise
    except SourceError as exc:
        raise ArtifactError(str(exc)) from exc
    except Exception as exc:  # safetensors, transformers, torch and gguf each raise their own kinds
        raise ArtifactError(f"{uri}: cannot load the model: {type(exc).__name__}: {exc}") from exc
    return LoadedArtifact(artifact, model, tokenizer, "torch")


def _verify_gguf_file(uri: str, path: Path, expected_sha256: str | None) -> Artifact:
    """A bare GGUF file is pinned by its own SHA-256."""
    digest = sha256_file(path)
    if expected_sha256 and expected_sha256.lower() != digest:
        raise ArtifactError(
            f"{uri}: sha256 {digest} does not match the requested {expected_sha256}", status=409
        )
    return Artifact(uri=uri, folder=path.parent, digest=digest, revision=short_id(digest), card=None)


def _gguf_model(path: Path) -> tuple[GGUFModel, PreTrainedTokenizerBase]:
    """Config, generation config and tokenizer: from the files beside the GGUF (a published folder
    has them) or else from the GGUF's own metadata (transformers reads both)."""
    folder = path.parent
    beside = (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    with TRANSFORMERS_LOCK:
        if beside:
            config = AutoConfig.from_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            config = AutoConfig.from_pretrained(folder, gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
    try:
        generation = (
            GenerationConfig.from_pretrained(folder) if beside else GenerationConfig.from_model_config(config)
        )
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    return GGUFModel(path, config, generation), tokenizer
