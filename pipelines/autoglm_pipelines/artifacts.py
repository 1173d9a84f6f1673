"""Model folders as the pipeline passes them between steps: config, tokenizer, safetensors weights.

A quantized folder also holds ``autoglm-quantization.json``, which tells the loader which modules
to rebuild as quantized ones before the weights are read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from autoglm_pipelines.quantization import (
    QUANTIZATION_FILE,
    QuantizationPlan,
    load_quantized_weights,
    save_quantized,
)
from autoglm_pipelines.uris import SourceError


def save_model_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    plan: QuantizationPlan | None = None,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    if plan is None:
        model.save_pretrained(folder, safe_serialization=True)
        return
    model.config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    save_quantized(model, plan, folder)


def load_model_folder(
    folder: Path,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, QuantizationPlan | None]:
    """Load a folder written by ``save_model_folder``; never unpickles."""
    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder}: no config.json: not a model folder (did the step before this one run?)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if (folder / QUANTIZATION_FILE).is_file():
        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
        try:
            plan = load_quantized_weights(model, folder)
        except (OSError, ValueError, RuntimeError) as exc:
            raise SourceError(f"{folder}: cannot load the quantized weights: {exc}") from exc
        model.eval()
        return model, tokenizer, plan
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    model.eval()  # type: ignore[no-untyped-call]
    return model, tokenizer, None
