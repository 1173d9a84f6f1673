"""Activation statistics of the source model on calibration text, recorded once by the calibrate step
and read by every compression that needs them (the compress step and each search trial).

- per-input-channel absolute maxima of every linear layer: static activation ranges, and the
  activation side of SmoothQuant's scale migration;
- optionally the inputs' Hessian ``H = 2/n X^T X`` of every linear layer, which GPTQ uses to
  compensate each column's rounding error. Layers fed the same tensor (q/k/v after one norm,
  gate/up after another) share one Hessian, stored once under the first layer's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ABSMAX_SUFFIX = ".input_absmax"
HESSIAN_SUFFIX = ".input_hessian"


@dataclass
class Statistics:
    """What calibration recorded, by module name."""

    absmax: dict[str, torch.Tensor]
    #: Hessians by module name; modules sharing an input map to the same tensor.
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    mean_nll: float = 0.0

    def save(self, absmax_file: Path, hessian_file: Path | None) -> None:
        save_file({f"{n}{ABSMAX_SUFFIX}": t.contiguous() for n, t in self.absmax.items()}, str(absmax_file))
        if hessian_file is not None and self.hessians:
            first: dict[int, str] = {}
            tensors: dict[str, torch.Tensor] = {}
            shared: dict[str, str] = {}
            for name, h in self.hessians.items():
                owner = first.setdefault(id(h), name)
                if owner == name:
                    tensors[f"{name}{HESSIAN_SUFFIX}"] = h.contiguous()
                else:
                    shared[name] = owner
            save_file(tensors, str(hessian_file), metadata={f"shared:{k}": v for k, v in shared.items()})

    @classmethod
    def load(cls, absmax_file: Path, hessian_file: Path | None = None) -> Statistics:
        absmax = {k.removesuffix(ABSMAX_SUFFIX): v for k, v in load_file(str(absmax_file)).items()}
        hessians: dict[str, torch.Tensor] = {}
        if hessian_file is not None and hessian_file.is_file():
            from safetensors import safe_open

            with safe_open(str(hessian_file), framework="pt") as f:
                metadata = f.metadata() or {}
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    hessians[key.removesuffix(HESSIAN_SUFFIX)] = f.get_tensor(key)
            for key, owner in metadata.items():
                if key.startswith("shared:") and owner in hessians:
                    hessians[key.removeprefix("shared:")] = hessians[owner]
        return cls(absmax=absmax, hessians=hessians)


def _linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if n and hasattr(m, "in_features") and hasattr(m, "out_features")
    ]


@torch.no_grad()
def collect_statistics(model: nn.Module, batches: torch.Tensor, *, hessians: bool = False) -> Statistics:
    """Run ``batches`` (``[n, length]`` token ids) through ``model`` and record each linear layer's
    per-input-channel absmax (and, with ``hessians``, its inputs' Hessian)."""
    absmax: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    shares: dict[str, str] = {}  # module -> the module whose Hessian it shares (same input tensor)
    # The input of the linear layer called last: layers fed one tensor run one after another.
    last: list[tuple[torch.Tensor, str]] = []
    rows = 0

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            peak = x.abs().amax(dim=0)
            absmax[name] = torch.maximum(absmax[name], peak) if name in absmax else peak
            if not hessians:
                return
            if name not in shares:
                shares[name] = last[0][1] if last and last[0][0] is inputs[0] else name
            last[:] = [(inputs[0], shares[name])]
            owner = shares[name]
            if owner == name:
                gram = x.t() @ x
                sums[name] = sums[name] + gram if name in sums else gram

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in _linears(model)]
    nll, count = 0.0, 0
    try:
        for row in batches:
            last.clear()
            logits = model(input_ids=row.unsqueeze(0)).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], row[1:], reduction="sum"))
            count += row.numel() - 1
            rows += row.numel()
    finally:
        for handle in handles:
            handle.remove()
    result = Statistics(absmax=absmax, mean_nll=nll / max(count, 1))
    if hessians:
        scaled = {name: 2.0 * total / max(rows, 1) for name, total in sums.items()}
        result.hessians = {name: scaled[owner] for name, owner in shares.items()}
    return result


def collect_input_absmax(model: nn.Module, batches: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
    """Each linear layer's per-input-channel absmax on ``batches`` and the mean next-token NLL."""
    stats = collect_statistics(model, batches)
    return stats.absmax, stats.mean_nll
