"""Activation statistics: per-input-channel absolute maxima of every linear layer on calibration text.

They give static activation ranges, and the activation side of SmoothQuant's scale migration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def collect_input_absmax(model: nn.Module, batches: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
    """Run ``batches`` (``[n, length]`` token ids) through ``model``; return each linear layer's
    per-input-channel absmax (by module name) and the mean next-token NLL."""
    absmax: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0)
            absmax[name] = torch.maximum(absmax[name], x) if name in absmax else x

        return record

    layers = [
        (n, m)
        for n, m in model.named_modules()
        if n and hasattr(m, "in_features") and hasattr(m, "out_features")
    ]
    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    nll, count = 0.0, 0
    try:
        for row in batches:
            logits = model(input_ids=row.unsqueeze(0)).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], row[1:], reduction="sum"))
            count += row.numel() - 1
    finally:
        for handle in handles:
            handle.remove()
    return absmax, nll / max(count, 1)
