"""Pruning: structured (whole MLP channels and attention head groups, by L1 importance) and 2:4.

``structured-l1`` physically shrinks the matrices, so the model gets smaller and faster on any
hardware. Hugging Face configs describe every decoder layer with the same sizes, so each layer
keeps the same number of channels (its own most important ones). Attention is pruned by whole
key/value groups (a KV head with the query heads that share it), and only when the sparsity
covers at least one whole group: removing a third of SmolLM2's attention for a 20% request would
be a different model.

``semi-structured-2of4`` zeroes the 2 smallest of every 4 consecutive input weights: the pattern
that sparse tensor cores accelerate. On CPUs it saves nothing by itself; it is a step towards them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _shrunk(
    linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Linear:
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = linear.bias.detach()[rows] if linear.bias is not None and rows is not None else linear.bias
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None and new.bias is not None:
        new.bias.data.copy_(bias.detach())
    return new


def _linear(module: nn.Module, name: str) -> nn.Linear:
    found = getattr(module, name)
    if not isinstance(found, nn.Linear):
        raise TypeError(f"{type(module).__name__}.{name} is {type(found).__name__}, not a Linear layer")
    return found


def _child(module: nn.Module, name: str) -> nn.Module:
    found = getattr(module, name)
    assert isinstance(found, nn.Module)
    return found


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]


def _keep_count(size: int, sparsity: float, multiple: int) -> int:
    keep = round(size * (1 - sparsity) / multiple) * multiple
    return max(multiple, min(size, keep))


@torch.no_grad()
def prune_structured_l1(model: nn.Module, sparsity: float) -> dict[str, Any]:
    """Remove MLP channels (and whole KV groups where the sparsity allows) by L1 importance, in place."""
    config: Any = getattr(model, "config")  # noqa: B009 (a Hugging Face model's config)
    layers = _decoder_layers(model)
    intermediate = int(config.intermediate_size)
    multiple = max(8, min(64, intermediate // 4))
    keep_channels = _keep_count(intermediate, sparsity, multiple)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    drop_groups = math.floor(kv_heads * sparsity + 1e-9)
    keep_groups = kv_heads - drop_groups if 0 < drop_groups < kv_heads else kv_heads
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    q_per_kv = int(config.num_attention_heads) // kv_heads
    for layer in layers:
        _prune_mlp(_child(layer, "mlp"), keep_channels)
        if keep_groups < kv_heads:
            _prune_kv_groups(_child(layer, "self_attn"), keep_groups, kv_heads, q_per_kv, head_dim)
    config.intermediate_size = keep_channels
    config.num_key_value_heads = keep_groups
    config.num_attention_heads = keep_groups * q_per_kv
    config.head_dim = head_dim  # no longer hidden_size / num_attention_heads
    return {
        "intermediateSize": {"before": intermediate, "after": keep_channels},
        "keyValueHeads": {"before": kv_heads, "after": keep_groups},
        "layers": len(layers),
    }


def _prune_mlp(mlp: nn.Module, keep: int) -> None:
    down = _linear(mlp, "down_proj")
    fused = getattr(mlp, "gate_up_proj", None)
    if isinstance(fused, nn.Linear):
        half = fused.out_features // 2
        gate_w, up_w = fused.weight[:half], fused.weight[half:]
    else:
        gate_w, up_w = _linear(mlp, "gate_proj").weight, _linear(mlp, "up_proj").weight
    importance = gate_w.abs().sum(1) + up_w.abs().sum(1) + down.weight.abs().sum(0)
    idx = importance.topk(keep).indices.sort().values
    if isinstance(fused, nn.Linear):
        mlp.gate_up_proj = _shrunk(fused, rows=torch.cat([idx, idx + fused.out_features // 2]))
    else:
        mlp.gate_proj = _shrunk(_linear(mlp, "gate_proj"), rows=idx)
        mlp.up_proj = _shrunk(_linear(mlp, "up_proj"), rows=idx)
    mlp.down_proj = _shrunk(down, cols=idx)


def _prune_kv_groups(attn: nn.Module, keep: int, kv_heads: int, q_per_kv: int, head_dim: int) -> None:
    q, k, v, o = (_linear(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    q_rows = q.weight.abs().sum(1).view(kv_heads, q_per_kv * head_dim).sum(1)
    kv_rows = (k.weight.abs().sum(1) + v.weight.abs().sum(1)).view(kv_heads, head_dim).sum(1)
    o_cols = o.weight.abs().sum(0).view(kv_heads, q_per_kv * head_dim).sum(1)
    groups = (q_rows + kv_rows + o_cols).topk(keep).indices.sort().values
    kv_idx = (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
    q_idx = (groups[:, None] * q_per_kv * head_dim + torch.arange(q_per_kv * head_dim)).flatten()
    attn.q_proj, attn.k_proj, attn.v_proj = (
        _shrunk(q, rows=q_idx),
        _shrunk(k, rows=kv_idx),
        _shrunk(v, rows=kv_idx),
    )
    attn.o_proj = _shrunk(o, cols=q_idx)
    for name in ("num_heads", "num_attention_heads"):
        if hasattr(attn, name):
            setattr(attn, name, keep * q_per_kv)
    if hasattr(attn, "num_key_value_heads"):
        setattr(attn, "num_key_value_heads", keep)  # noqa: B010 (a plain int attribute, not a submodule)


@torch.no_grad()
def prune_2of4(model: nn.Module) -> dict[str, Any]:
    """Zero the 2 smallest-magnitude weights of every 4 consecutive inputs in the decoder's linears."""
    count = 0
    for layer in _decoder_layers(model):
        for linear in layer.modules():
            if isinstance(linear, nn.Linear) and linear.in_features % 4 == 0:
                w = linear.weight.view(linear.out_features, -1, 4)
                drop = w.abs().topk(2, dim=-1, largest=False).indices
                w.scatter_(-1, drop, 0.0)
                count += 1
    return {"maskedLinears": count, "pattern": "2:4"}
