"""SmoothQuant scale migration (Xiao et al., 2023) for Llama- and GLM-style decoder layers.

Activation outliers make per-token int8 activations lossy. For each input channel j of a group of
linears sharing one input, ``s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha)``; the input is divided by
``s`` where it is produced and the weights' columns are multiplied by it, which leaves the float
model's function unchanged while moving the outliers into the weights:

- ``input_layernorm`` -> ``q_proj``, ``k_proj``, ``v_proj`` (the norm's weight absorbs ``1/s``);
- ``post_attention_layernorm`` -> ``gate_proj`` and ``up_proj`` (or GLM's fused ``gate_up_proj``);
- ``up_proj``'s output rows -> ``down_proj`` (down's input is ``act(gate) * up``, so it is exact);
  this is where SmolLM2's largest activations are.

Only norms of the form ``weight * normalize(x)`` are folded into; other layers are left as they are
and reported.
"""

from __future__ import annotations

import torch
from torch import nn

#: RMSNorm classes whose output is ``weight * normalized`` (no ``1 + weight`` offset). GLM's own
#: text models each define one (GLM, GLM-4, GLM-4-MoE, GLM-4.5 and later); a test checks every name
#: listed here against the class transformers ships.
FOLDABLE_NORMS = {
    "LlamaRMSNorm",
    "Qwen2RMSNorm",
    "Qwen3RMSNorm",
    "MistralRMSNorm",
    "GlmRMSNorm",
    "Glm4RMSNorm",
    "Glm4MoeRMSNorm",
    "Glm4MoeLiteRMSNorm",
    "GlmMoeDsaRMSNorm",
    "Glm4vRMSNorm",
    "Glm4vMoeRMSNorm",
    "Glm4vMoeTextRMSNorm",
    "Glm5NextRMSNorm",
    "Glm5NextTextRMSNorm",
}
MIN_SCALE = 1e-5


def _scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0).float()
    act = act_absmax.float().clamp(min=MIN_SCALE)
    return (act.pow(alpha) / w_max.clamp(min=MIN_SCALE).pow(1 - alpha)).clamp(min=MIN_SCALE)


@torch.no_grad()
def _scale_columns(linears: list[nn.Linear], s: torch.Tensor) -> None:
    for linear in linears:
        linear.weight.mul_(s.to(linear.weight.dtype)[None, :])


@torch.no_grad()
def smooth_model(
    model: nn.Module, act_absmax: dict[str, torch.Tensor], *, alpha: float = 0.5
) -> dict[str, str]:
    """Migrate activation outliers into the weights, in place; return what was smoothed or skipped."""
    report: dict[str, str] = {}
    for name, layer in model.named_modules():
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            continue
        report.update(_smooth_attention_input(name, layer, attn, act_absmax, alpha))
        report.update(_smooth_mlp(name, layer, mlp, act_absmax, alpha))
    return report


def _norm_foldable(norm: nn.Module | None) -> bool:
    return (
        norm is not None
        and type(norm).__name__ in FOLDABLE_NORMS
        and isinstance(getattr(norm, "weight", None), torch.Tensor)
    )


def _smooth_attention_input(
    prefix: str, layer: nn.Module, attn: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float
) -> dict[str, str]:
    key = f"{prefix}.self_attn.q_proj"
    linears = [
        getattr(attn, n)
        for n in ("q_proj", "k_proj", "v_proj")
        if isinstance(getattr(attn, n, None), nn.Linear)
    ]
    norm = getattr(layer, "input_layernorm", None)
    if not linears or key not in act_absmax or not _norm_foldable(norm):
        return {key: "skipped: no foldable input_layernorm -> q/k/v"}
    assert norm is not None
    s = _scales(act_absmax[key], [lin.weight for lin in linears], alpha)
    norm.weight.div_(s.to(norm.weight.dtype))
    _scale_columns(linears, s)
    return {key: "smoothed q/k/v"}


def _smooth_mlp(
    prefix: str, layer: nn.Module, mlp: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float
) -> dict[str, str]:
    report: dict[str, str] = {}
    fused = getattr(mlp, "gate_up_proj", None)
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    inputs = [fused] if isinstance(fused, nn.Linear) else [m for m in (gate, up) if isinstance(m, nn.Linear)]
    key = f"{prefix}.mlp.{'gate_up_proj' if isinstance(fused, nn.Linear) else 'gate_proj'}"
    norm = getattr(layer, "post_attention_layernorm", None)
    if inputs and key in act_absmax and _norm_foldable(norm):
        assert norm is not None
        s = _scales(act_absmax[key], [lin.weight for lin in inputs], alpha)
        norm.weight.div_(s.to(norm.weight.dtype))
        _scale_columns(inputs, s)
        report[key] = "smoothed gate/up"
    else:
        report[key] = "skipped: no foldable post_attention_layernorm -> gate/up"

    down = getattr(mlp, "down_proj", None)
    down_key = f"{prefix}.mlp.down_proj"
    if not isinstance(down, nn.Linear) or down_key not in act_absmax:
        report[down_key] = "skipped: no down_proj statistics"
        return report
    s = _scales(act_absmax[down_key], [down.weight], alpha)
    # down's input channel j is act(gate_j) * up_j: dividing up's output row j by s_j divides it.
    if isinstance(up, nn.Linear):
        rows = up.weight
        rows.div_(s.to(rows.dtype)[:, None])
        if up.bias is not None:
            up.bias.div_(s.to(up.bias.dtype))
    elif isinstance(fused, nn.Linear):
        half = fused.out_features // 2  # GLM: gate rows first, then up rows
        fused.weight[half:].div_(s.to(fused.weight.dtype)[:, None])
        if fused.bias is not None:
            fused.bias[half:].div_(s.to(fused.bias.dtype))
    else:
        report[down_key] = "skipped: no up projection to fold into"
        return report
    _scale_columns([down], s)
    report[down_key] = "smoothed down (folded into up)"
    return report
