"""Text datasets as token windows, for calibration and perplexity."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from autoglm_core.uris import SourceError


def read_text(path: Path) -> str:
    """A UTF-8 text file, or every ``*.txt`` file of a folder in name order."""
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise SourceError(f"{path}: no .txt files in the dataset folder")
    try:
        return "\n".join(f.read_text(encoding="utf-8") for f in files)
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: the dataset is not UTF-8 text") from exc


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str, *, max_tokens: int | None = None) -> torch.Tensor:
    """The text as one 1-D tensor of token ids (no special tokens), cut to ``max_tokens``."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    tensor = torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)
    if tensor.numel() < 2:
        raise SourceError("the dataset has fewer than 2 tokens")
    return tensor


def windows(ids: torch.Tensor, *, length: int, count: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[n, length]`` from the start of ``ids`` (the last partial one dropped)."""
    n = ids.numel() // length
    if n == 0:
        raise SourceError(f"the dataset has {ids.numel()} tokens, fewer than one window of {length}")
    if count is not None:
        n = min(n, count)
    return ids[: n * length].view(n, length)
