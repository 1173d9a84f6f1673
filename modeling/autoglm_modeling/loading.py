"""Load any Hugging Face causal LM: a model folder, a safetensors checkpoint or a GGUF file.

GGUF files go through transformers' GGUF loader (which de-quantizes them) once; the result is
cached as safetensors under the cache folder, keyed by the file's SHA-256, so later loads are
plain safetensors reads. Nothing is ever unpickled: ``use_safetensors=True`` throughout.
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from autoglm_core.digests import sha256_file
from autoglm_core.uris import SourceError

Format = Literal["huggingface", "gguf", "safetensors"]
#: Held around every model transformers builds or loads in this process. ``from_pretrained``
#: replaces ``PreTrainedModel.tie_weights`` with a no-op on the class while it loads
#: (``transformers.initialization.no_tie_weights``, 5.23 and 5.24), so a model built or loaded by
#: another thread meanwhile keeps an untied lm_head on the meta device: 80 of 80 loads of a tied
#: model in two threads at once came out so (two model names loading in one server, say).
TRANSFORMERS_LOCK = threading.RLock()


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    #: The folder the weights were read from (for GGUF: the safetensors conversion in the cache).
    folder: Path


def cache_kwargs(model: nn.Module, cache: Cache) -> dict[str, Any]:
    """The KV-cache keyword arguments of ``model.forward``: transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name warns); older releases know only the old one."""
    name = "cache" if "cache" in _forward_parameters(type(model)) else "past_key_values"
    return {name: cache, "use_cache": True}


_FORWARD_PARAMETERS: dict[type[nn.Module], frozenset[str]] = {}


def _forward_parameters(cls: type[nn.Module]) -> frozenset[str]:
    """Looked up once per model class (every decode step asks)."""
    if cls not in _FORWARD_PARAMETERS:
        _FORWARD_PARAMETERS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return _FORWARD_PARAMETERS[cls]


def detect_format(path: Path, declared: Format | None) -> Format:
    """The checkpoint format: as declared, else from the path (a .gguf file, a .safetensors file, a folder)."""
    if declared is not None:
        return declared
    if path.is_dir():
        return "huggingface"
    if path.suffix == ".gguf":
        return "gguf"
    if path.suffix == ".safetensors":
        return "safetensors"
    raise SourceError(
        f"{path}: cannot tell the format; set spec.source.format to huggingface, gguf or safetensors"
    )


def load_causal_lm(
    path: Path, fmt: Format | None, *, cache_dir: Path, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load model and tokenizer from ``path``; raises SourceError when the checkpoint is unusable."""
    fmt = detect_format(path, fmt)
    if fmt == "gguf":
        folder = gguf_as_safetensors(path, cache_dir=cache_dir)
    elif fmt == "safetensors":
        if not path.is_file():
            raise SourceError(f"{path}: format safetensors needs a .safetensors file beside its config.json")
        folder = path.parent
    else:
        folder = path
    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder}: no config.json: not a Hugging Face model folder")
    try:
        with TRANSFORMERS_LOCK:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{folder}: cannot load the model: {exc}") from exc
    model.eval()  # type: ignore[no-untyped-call]
    return LoadedModel(model=model, tokenizer=tokenizer, folder=folder)


def gguf_as_safetensors(path: Path, *, cache_dir: Path) -> Path:
    """Convert a GGUF file to a safetensors model folder once; return the cached folder."""
    if not path.is_file():
        raise SourceError(f"{path}: format gguf needs a .gguf file")
    digest = sha256_file(path)
    folder = cache_dir / "gguf" / digest[:24]
    marker = folder / "autoglm-conversion.json"
    if marker.is_file():
        return folder
    try:
        with TRANSFORMERS_LOCK:
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SourceError(f"{path}: not a GGUF model transformers can read: {exc}") from exc
    # Each converter (another model name in one server, another process) writes its own temporary
    # folder beside the target and renames it into place in one step; a loser discards its copy.
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        # The loader de-quantized the weights to fp32 but still marks the model as GGUF-quantized, which
        # save_pretrained refuses; a plain model of the same config holds the very same weights.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with TRANSFORMERS_LOCK:
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
        plain.load_state_dict(model.state_dict(), strict=True)
        plain.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        info: dict[str, Any] = {"source": str(path), "sha256": digest, "architecture": type(model).__name__}
        (partial / "autoglm-conversion.json").write_text(json.dumps(info, indent=2))
        partial.chmod(0o755)  # mkdtemp made it private to this user
        try:
            partial.rename(folder)  # atomic; fails when another converter's folder is already there
        except OSError as exc:
            if not marker.is_file():
                raise SourceError(f"{folder}: exists but is not a finished conversion; delete it") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already when the rename won
    return folder
