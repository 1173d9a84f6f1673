"""Model folders as the pipeline passes them between steps and publishes them: config, tokenizer,
safetensors weights.

Quantized models are written in the compressed-tensors format (``quantization_config`` in
``config.json``; see ``ctformat``), which transformers, vLLM and llm-compressor read; bf16/fp16 are
plain checkpoints. ``autoglm-quantization.json`` beside them keeps AutoGLM's plan (method, what was
skipped and why, SmoothQuant's migrated layers) as lineage; the format alone is enough to load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
from autoglm_modeling import ctformat
from autoglm_modeling.loading import TRANSFORMERS_LOCK
from autoglm_modeling.quantization import CAST_METHODS, QUANTIZATION_FILE, QuantizationPlan


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
    ctformat.save(model, plan, folder)
    (folder / QUANTIZATION_FILE).write_text(json.dumps(plan.to_json(), indent=2))


def load_model_folder(
    folder: Path,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, QuantizationPlan | None]:
    """Load a folder written by ``save_model_folder``; never unpickles."""
    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder}: no config.json: not a model folder (did the step before this one run?)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    plan_file = folder / QUANTIZATION_FILE
    plan = _read_plan(plan_file) if plan_file.is_file() else None
    config_data = _read_config(folder)
    if ctformat.is_compressed_tensors(config_data):
        config = AutoConfig.from_pretrained(folder)
        quantization_config = config_data["quantization_config"]
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # built plain, then our modules take the stored tensors
        dtype = getattr(torch, plan.dtype) if plan is not None else _compute_dtype(quantization_config)
        with TRANSFORMERS_LOCK:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
        try:
            plan = ctformat.load_into(model, folder, quantization_config, dtype, hint=plan)
        except (OSError, ValueError, RuntimeError) as exc:
            raise SourceError(f"{folder}: cannot load the compressed-tensors weights: {exc}") from exc
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


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "config.json").read_text())
    except ValueError as exc:
        raise SourceError(f"{folder}/config.json: not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SourceError(f"{folder}/config.json: not a JSON object")
    return data


def _compute_dtype(quantization_config: dict[str, Any]) -> torch.dtype:
    """What ``quantize_model`` computes in: fp32 around int8 x int8 products, else bf16."""
    groups = quantization_config.get("config_groups") or {}
    dynamic = any(isinstance(g, dict) and g.get("input_activations") for g in groups.values())
    return torch.float32 if dynamic else torch.bfloat16


def gguf_weights_file(folder: Path) -> Path | None:
    """The GGUF file holding a folder's weights: its one ``.gguf`` where it has no safetensors (what
    the pipeline publishes for llama.cpp), else None."""
    files = sorted(folder.glob("*.gguf"))
    if len(files) == 1 and not any(folder.glob("*.safetensors")):
        return files[0]
    return None


def artifact_format(folder: Path) -> dict[str, str]:
    """What the model card says about a saved folder's format and who loads it."""
    gguf = gguf_weights_file(folder)
    if gguf is not None:
        from autoglm_modeling.gguf_export import gguf_kind  # the gguf reader only where there is a GGUF

        return {
            "format": f"gguf ({gguf_kind(gguf)})",
            "loading": f"llama.cpp: autoglm serve (engine auto or llama.cpp), llama-server -m {gguf.name}; "
            f"transformers from_pretrained(folder, gguf_file='{gguf.name}') dequantizes it",
        }
    config = _read_config(folder)
    if ctformat.is_compressed_tensors(config):
        q = config["quantization_config"]
        return {
            "format": f"compressed-tensors ({q.get('format')}, compressed-tensors {q.get('version')})",
            "loading": "transformers AutoModelForCausalLM.from_pretrained(folder) with the compressed-tensors "
            "package (int8 W8A16 and W8A8); vLLM; autoglm serve. Asymmetric 4-bit: compressed-tensors' "
            "ModelCompressor (transformers 5.24 cannot place packed zero points)",
        }
    return {"format": "safetensors", "loading": "transformers AutoModelForCausalLM.from_pretrained(folder)"}
