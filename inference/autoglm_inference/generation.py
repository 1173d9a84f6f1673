"""Batched autoregressive decoding with a KV cache, rows joining and leaving between steps.

A :class:`DecodeBatch` holds the rows being decoded together: their KV cache (left-padded to a
common length), a 2-D attention mask over it, and each row's position. ``prefill`` starts rows
from prompts; ``merge`` joins a freshly prefilled batch into a running one (continuous batching);
``step`` decodes one token for every row; ``keep`` drops finished rows. Left padding is masked and
positions count only real tokens, so a row decodes the same tokens alone or in any batch.

Synchronous and single-threaded: the engine (``engine.py``) owns the thread that calls it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from autoglm_inference.sampling import Sampling, row_generator, sample_row
from autoglm_modeling.loading import cache_kwargs


class DecodeBatch:
    """Rows decoded together; ``tokens`` holds each row's last token, the next step's input."""

    def __init__(
        self,
        cache: DynamicCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        tokens: torch.Tensor,
        sampling: list[Sampling],
        generators: list[np.random.Generator | None],
    ) -> None:
        self.cache = cache
        self.mask = mask  # [rows, cache length] 1 for real tokens
        self.positions = positions  # [rows] position of the next token to feed
        self.tokens = tokens  # [rows] the token to feed next (sampled by the last forward)
        self.sampling = sampling
        self.generators = generators
        self.model: nn.Module | None = None  # the model ``step`` runs when given none (set by prefill)

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    def next_tokens(self) -> list[int]:
        return [int(t) for t in self.tokens.tolist()]

    @classmethod
    @torch.inference_mode()
    def prefill(
        cls, model: nn.Module, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling]
    ) -> DecodeBatch:
        """Run the prompts (left-padded) and sample each row's first new token."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        device = model_device(model)
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            **cache_kwargs(model, cache),
            logits_to_keep=1,  # only the last position: [rows, prompt, vocab] logits would be GBs
        )
        generators = [row_generator(s) for s in sampling]
        batch = cls(
            cache=cache,
            mask=mask,
            positions=mask.sum(-1),
            tokens=torch.zeros(len(prompts), dtype=torch.long, device=device),
            sampling=list(sampling),
            generators=generators,
        )
        batch.tokens = batch._sample(out.logits[:, -1, :])
        batch.model = model
        return batch

    @torch.inference_mode()
    def step(self, model: nn.Module | None = None) -> torch.Tensor:
        """Feed every row's last token; returns (and keeps) the next token of each row."""
        model = model or self.model
        assert model is not None, "step needs the model (prefill sets it)"
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        out = model(
            input_ids=self.tokens.view(-1, 1),
            attention_mask=self.mask,
            position_ids=self.positions.view(-1, 1),
            **cache_kwargs(model, self.cache),
        )
        self.positions = self.positions + 1
        self.tokens = self._sample(out.logits[:, -1, :])
        return self.tokens

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order); trims cache columns no remaining row uses."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.positions = self.positions[index]
        self.tokens = self.tokens[index]
        self.sampling = [self.sampling[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]
        if self.size:
            self._trim()

    def merge(self, other: object) -> None:
        """Append ``other``'s rows, left-padding the shorter cache so both share one length."""
        assert isinstance(other, DecodeBatch)
        length = max(self.mask.shape[1], other.mask.shape[1])
        layers = []
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            (my_keys, my_values), (their_keys, their_values) = _kv(mine), _kv(theirs)
            keys = torch.cat([_pad_left(my_keys, length), _pad_left(their_keys, length)])
            values = torch.cat([_pad_left(my_values, length), _pad_left(their_values, length)])
            layers.append((keys, values))
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.cat(
            [
                functional.pad(self.mask, (length - self.mask.shape[1], 0)),
                functional.pad(other.mask, (length - other.mask.shape[1], 0)),
            ]
        )
        self.positions = torch.cat([self.positions, other.positions])
        self.tokens = torch.cat([self.tokens, other.tokens])
        self.sampling += other.sampling
        self.generators += other.generators

    def _trim(self) -> None:
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        if start == 0:
            return
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            keys, values = _kv(layer)
            assert isinstance(layer, DynamicLayer)
            layer.keys, layer.values = keys[:, :, start:], values[:, :, start:]

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        tokens = logits.argmax(-1)
        for row, (sampling, generator) in enumerate(zip(self.sampling, self.generators, strict=True)):
            if sampling.temperature > 0:
                tokens[row] = sample_row(logits[row].float().cpu().numpy(), sampling, generator)
        return tokens


def _kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
        raise TypeError(f"batching needs a plain full-attention KV cache, got {type(layer).__name__}")
    return layer.keys, layer.values


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    return functional.pad(t, (0, 0, length - t.shape[2], 0)) if t.shape[2] < length else t


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights are (CPU, or the GPU it was moved to)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
