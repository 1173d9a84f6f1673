"""Model folders as the pipeline passes them between steps: config, tokenizer, safetensors weights.

A quantized folder also holds ``autoglm-quantization.json``, which tells the loader which modules
to rebuild as quantized ones before the weights are read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from autoglm_core.camel import field_errors
from autoglm_core.uris import SourceError
from autoglm_modeling.loading import TRANSFORMERS_LOCK
from autoglm_modeling.quantization import (
    CAST_METHODS,
    QUANTIZATION_FILE,
    QuantizationPlan,
    load_quantized_weights,
    save_quantized,
)


def save_model_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    plan: QuantizationPlan | None = None,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    if plan is None or plan.method in CAST_METHODS:  # a standard checkpoint any HF loader reads
        model.save_pretrained(folder, safe_serialization=True)
        if plan is not None:
            (folder / QUANTIZATION_FILE).write_text(json.dumps(plan.to_json(), indent=2))
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
    plan_file = folder / QUANTIZATION_FILE
    plan = _read_plan(plan_file) if plan_file.is_file() else None
    if plan is not None and plan.method not in CAST_METHODS:
        config = AutoConfig.from_pretrained(folder)
        with TRANSFORMERS_LOCK:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
        try:
            load_quantized_weights(model, folder)
        except (OSError, ValueError, RuntimeError) as exc:
            raise SourceError(f"{folder}: cannot load the quantized weights: {exc}") from exc
    else:
        dtype = getattr(torch, plan.dtype) if plan is not None else torch.float32
        with TRANSFORMERS_LOCK:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    model.eval()
    return model, tokenizer, plan


def _read_plan(path: Path) -> QuantizationPlan:
    try:
        return QuantizationPlan.from_json(json.loads(path.read_text()))
    except ValidationError as exc:
        raise SourceError(f"{path}: not a valid quantization plan: {field_errors(exc)}") from exc
    except ValueError as exc:
        raise SourceError(f"{path}: not JSON: {exc}") from exc
