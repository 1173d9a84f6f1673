"""GPTQ for 4-bit weights with per-group scales and integer zero points (Frantar et al., 2022).

Columns are quantized left to right; each column's rounding error, weighted by the inverse Hessian
of the layer's calibration inputs, is pushed onto the columns not yet quantized, so the layer's
outputs on inputs like the calibration data move less than with round-to-nearest. A group's scale
and zero point are chosen when the quantization reaches its first column, from the weights as the
earlier columns' errors left them. The format is exactly what ``quantize_int4_with_points``
produces (q, z in [0, 15], ``w ~= (q - z) * scale``), so the result is served and published the
same way.

Written here rather than taken from llm-compressor: its GPTQ is tied to its own model wrappers and
calibration pipeline; this one takes a weight and a Hessian and returns integers (about 60 lines).
The Hessians come from the source model (``calibration.collect_statistics``), recorded once for
every trial, not re-measured layer by layer on the partly quantized model as the paper does.
"""

from __future__ import annotations

import torch

from autoglm_modeling.quantization import int4_group_params

#: Columns updated together: the lazy batch update of the paper (the result does not depend on it).
BLOCK = 128
#: Dampening added to the Hessian's diagonal, as a fraction of its mean (the paper's 1%).
DAMP = 0.01


@torch.no_grad()
def gptq_int4(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int, *, damp: float = DAMP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` ``[out, in]`` given its inputs' Hessian ``[in, in]``.

    Returns q as uint8 ``[out, in]``, the scale ``[out, in / group]`` (bf16-exact values in fp32)
    and the zero point as uint8 ``[out, in / group]``.
    """
    w = weight.detach().to(torch.float64).clone()
    out_features, in_features = w.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"a Hessian of shape {tuple(hessian.shape)} does not fit a weight with {in_features} inputs"
        )
    if in_features % group_size:
        raise ValueError(f"{in_features} inputs are not a multiple of the group size {group_size}")
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0  # inputs that never fired: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(in_features, dtype=h.dtype)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    groups = in_features // group_size
    q = torch.zeros(out_features, in_features, dtype=torch.uint8)
    scale = torch.zeros(out_features, groups, dtype=torch.float32)
    point = torch.zeros(out_features, groups, dtype=torch.uint8)
    for start in range(0, in_features, BLOCK):
        end = min(start + BLOCK, in_features)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        hinv = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % group_size == 0:  # the group's parameters, from the weights as updated so far
                g = column // group_size
                span = (
                    block[:, i : i + group_size]
                    if i + group_size <= end - start
                    else w[:, column : column + group_size]
                )
                s, z = int4_group_params(span.to(torch.float32))
                scale[:, g], point[:, g] = s, z
            g = column // group_size
            s, z = scale[:, g].to(torch.float64), point[:, g].to(torch.float64)
            code = torch.clamp(torch.round(block[:, i] / s + z), 0, 15)
            q[:, column] = code.to(torch.uint8)
            error = (block[:, i] - (code - z) * s) / hinv[i, i]
            block[:, i:] -= error.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return q, scale, point
