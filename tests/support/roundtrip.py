"""Compare a published compressed-tensors folder as AutoGLM serves it with what other runtimes load."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from autoglm_modeling.loading import TRANSFORMERS_LOCK
from autoglm_modeling.quantization import (
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    KernelSupport,
    kernel_support_as,
    run_activations_in_fp32,
)
from tests.support.ct_oracle import decompressed

#: transformers 5.24 with compressed-tensors 0.20 cannot load asymmetric packed 4-bit weights
#: (its meta-device compress leaves zero points unpacked); they are read with the package's own
#: decompression instead. The README says so.
PLAIN_TRANSFORMERS = {"int8-weight-only", "int8-dynamic", "smoothquant-w8a8"}


def other_runtime(folder: Path, method: str) -> PreTrainedModel:
    """The folder as transformers loads it, or (4-bit) as compressed-tensors decompresses it: fp32."""
    if method in PLAIN_TRANSFORMERS:
        with TRANSFORMERS_LOCK:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return model
    return decompressed(folder)


def weight_gaps(ours: nn.Module, theirs: nn.Module) -> dict[str, float]:
    """For each quantized module: the largest difference between our dequantized weight and theirs,
    in units of that module's quantization step (0 means bit for bit)."""
    gaps = {}
    for name, module in ours.named_modules():
        if isinstance(module, Int8WeightOnlyLinear | Int8DynamicLinear | Int4WeightOnlyLinear):
            if isinstance(module, Int4WeightOnlyLinear):
                step = module.weight_scale.float().repeat_interleave(module.group_size, dim=1)
                mine = module.dequantized()
            else:
                step = module.weight_scale.float()[:, None].expand(-1, module.in_features)
                mine = module.weight_int8.float() * module.weight_scale.float()[:, None]
            other = theirs.get_submodule(name).weight.detach().float()
            gaps[name] = float(((mine - other).abs() / step).max())
    return gaps


#: A CPU without native bf16, where AutoGLM's kernel runs everything with fp32 activations.
FP32_ACTIVATIONS = KernelSupport(cpu_autoglm=True)


def fp32_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Our model's logits with fp32 activations on its stored weights (as on a CPU without native
    bf16, through AutoGLM's kernel): comparable with an fp32 run of the dequantized weights."""
    model = copy.deepcopy(model)
    with kernel_support_as(FP32_ACTIVATIONS):
        run_activations_in_fp32(model)
        with torch.no_grad():
            return model(input_ids=ids).logits.float()
