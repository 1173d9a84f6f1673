"""compressed-tensors' own way to read a checkpoint, as an oracle outside AutoGLM's reader.

``decompressed(folder)``: the model built plain from its config, given compressed-tensors'
quantization parameters (``apply_quantization_config``), compressed to the format's layout, loaded
with the checkpoint's tensors, then decompressed by ``ModelCompressor.decompress_model``: dense
float weights, exactly as the format defines them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from autoglm_modeling.loading import TRANSFORMERS_LOCK


def decompressed(folder: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    raw = json.loads((folder / "config.json").read_text())["quantization_config"]
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    with TRANSFORMERS_LOCK:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()  # type: ignore[no-untyped-call]
    qconfig = QuantizationConfig.model_validate({k: v for k, v in raw.items() if k != "quant_method"})
    apply_quantization_config(model, qconfig, run_compressed=False)
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(model)
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("lm_head.weight") for k in missing) or not missing, missing
    compressor.decompress_model(model)
    return model
