"""Published quantized models are compressed-tensors checkpoints: other runtimes load the same
weights AutoGLM validated, and AutoGLM reads them back bit for bit onto its fast modules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from autoglm_modeling import cpugemm
from autoglm_modeling.folders import load_model_folder, save_model_folder
from autoglm_modeling.quantization import (
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    quantize_model,
)
from autoglm_pipelines.calibration import collect_input_absmax
from tests.support.roundtrip import fp32_logits, other_runtime, weight_gaps
from tests.support.tiny_models import tiny_glm

needs_kernel = pytest.mark.skipif(
    not cpugemm.available(), reason=f"no AutoGLM CPU kernel: {cpugemm.why_unavailable()}"
)
PROMPT = "To be, or not to be, that is the question: whether tis nobler in the mind"
CASES = [
    ("int8-weight-only", None, "pack-quantized"),
    ("int4-weight-only", 32, "pack-quantized"),
    ("int4-weight-only", None, "pack-quantized"),  # the default: each layer's largest group that fits
    ("int8-dynamic", None, "int-quantized"),
    ("smoothquant-w8a8", None, "int-quantized"),
]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_glm(tmp_path_factory.mktemp("ct") / "glm", init_std=0.1, seed=4)


def publish(
    source: Path, folder: Path, method: str, group_size: int | None
) -> tuple[torch.nn.Module, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    model, _, _ = load_model_folder(source)
    absmax = collect_input_absmax(model, ids)[0] if method == "smoothquant-w8a8" else None
    plan = quantize_model(model, method, group_size=group_size, activation_absmax=absmax)
    save_model_folder(model, tokenizer, folder, plan)
    return model, ids


@needs_kernel
@pytest.mark.parametrize(("method", "group_size", "fmt"), CASES)
def test_other_runtimes_load_the_weights_autoglm_validated(
    source: Path, tmp_path: Path, method: str, group_size: int | None, fmt: str
) -> None:
    quantized, ids = publish(source, tmp_path / "q", method, group_size)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    assert q["quantization_status"] == "compressed"
    assert {g["format"] for g in q["config_groups"].values()} == {fmt}
    assert config["tie_word_embeddings"] is False  # the int8 head is its own tensor

    theirs = other_runtime(tmp_path / "q", method)
    with torch.no_grad():
        other = theirs(input_ids=ids).logits.float()  # the first forward decompresses the weights
    gaps = weight_gaps(quantized, theirs)
    assert len(gaps) == 2 * 6 + 1  # every projection of both layers (gate_up fused) and the head
    assert max(gaps.values()) == 0.0  # bit for bit: the same integers, scales and zero points

    ours = fp32_logits(quantized, ids)
    if method in ("int8-dynamic", "smoothquant-w8a8"):
        # Both quantize each token's activations on the fly, with scales that differ in rounding
        # (absmax/127 here, absmax/127.5 in compressed-tensors): close, not equal.
        assert float((ours - other).norm() / other.norm()) < 0.03
        assert float((ours.argmax(-1) == other.argmax(-1)).float().mean()) >= 0.9
    else:
        assert torch.allclose(ours, other, rtol=1e-4, atol=1e-4), float((ours - other).abs().max())


@pytest.mark.parametrize(("method", "group_size", "fmt"), CASES)
def test_autoglm_reads_its_published_folder_back_exactly(
    source: Path, tmp_path: Path, method: str, group_size: int | None, fmt: str
) -> None:
    quantized, ids = publish(source, tmp_path / "q", method, group_size)
    loaded, _, plan = load_model_folder(tmp_path / "q")
    assert plan is not None
    kinds = {type(m) for m in loaded.modules()}
    assert kinds & {
        Int8WeightOnlyLinear,
        Int4WeightOnlyLinear,
        Int8DynamicLinear,
    }  # the fast modules, not float
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, quantized(input_ids=ids).logits)
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [
        "autoglm-quantization.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def llm_compressor_style_checkpoint(source: Path, folder: Path) -> None:
    """A checkpoint written by the compressed-tensors package itself, as llm-compressor writes one:
    W4A16 symmetric per group of 32 for the attention, 4-bit per channel for the MLP, head in float."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from transformers import AutoModelForCausalLM

    from autoglm_modeling.loading import TRANSFORMERS_LOCK

    with TRANSFORMERS_LOCK:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    group = QuantizationArgs(num_bits=4, symmetric=True, strategy="group", group_size=32)
    channel = QuantizationArgs(num_bits=4, symmetric=True, strategy="channel")
    config = QuantizationConfig(
        config_groups={
            "attention": QuantizationScheme(
                targets=["re:.*self_attn.*"], weights=group, format="pack-quantized"
            ),
            "mlp": QuantizationScheme(targets=["re:.*mlp.*"], weights=channel, format="pack-quantized"),
        },
        format="pack-quantized",
        ignore=["lm_head"],
    )
    apply_quantization_config(model, config)
    for module in model.modules():  # the observer's job in llm-compressor: absmax scales
        if hasattr(module, "weight_scale"):
            w = module.weight.detach()
            size = 32 if module.weight_scale.shape[-1] > 1 else w.shape[1]
            absmax = w.view(w.shape[0], -1, size).abs().amax(-1)
            module.weight_scale.data = (absmax / 7.5).clamp(min=1e-8).to(module.weight_scale.dtype)
    compressor = ModelCompressor(quantization_config=config)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    compressor.update_config(str(folder))


@needs_kernel
def test_a_checkpoint_from_llm_compressor_is_served_on_autoglm_modules(source: Path, tmp_path: Path) -> None:
    from torch import nn

    from tests.support.ct_oracle import decompressed

    untied = tiny_glm(tmp_path / "glm", init_std=0.1, seed=4, tie=False)
    llm_compressor_style_checkpoint(untied, tmp_path / "ct")
    loaded, _, plan = load_model_folder(tmp_path / "ct")
    assert plan is not None
    attention = loaded.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(attention, Int4WeightOnlyLinear)  # 4-bit per group: the fast module
    assert attention.group_size == 32
    mlp = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert type(mlp) is nn.Linear  # 4-bit per channel: no AutoGLM module holds it, decompressed
    assert "decompressed" in plan.skipped["model.layers.0.mlp.down_proj"]
    assert "lm_head" in plan.skipped

    ids = AutoTokenizer.from_pretrained(untied)(PROMPT, return_tensors="pt").input_ids
    oracle = decompressed(tmp_path / "ct")
    with torch.no_grad():
        want = oracle(input_ids=ids).logits.float()
    assert max(weight_gaps(loaded, oracle).values()) == 0.0  # symmetric: no zero point to round
    got = fp32_logits(loaded, ids)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3), float((got - want).abs().max())


@pytest.mark.parametrize("method", ["int8-weight-only", "int8-dynamic"])
def test_a_reloaded_model_keeps_the_dtypes_and_bytes_it_was_validated_with(
    source: Path, tmp_path: Path, method: str
) -> None:
    from autoglm_modeling.quantization import weight_bytes

    quantized, _ = publish(source, tmp_path / "q", method, None)
    loaded, _, _ = load_model_folder(tmp_path / "q")
    assert weight_bytes(loaded) == weight_bytes(quantized)
    want = {k: t.dtype for k, t in quantized.state_dict().items()}
    assert {k: t.dtype for k, t in loaded.state_dict().items()} == want
    assert want["model.embed_tokens.weight"] == torch.bfloat16


def test_an_int8_embedding_table_is_refused_with_the_reason(source: Path) -> None:
    """transformers and vLLM load no quantized Embedding: such a model is not published half-loadable."""
    from autoglm_modeling.ctformat import FormatError, compressed_state
    from autoglm_modeling.quantization import Int8Embedding

    model, _, _ = load_model_folder(source)
    plan = quantize_model(model, "int8-weight-only")
    table = model.get_input_embeddings()
    model.model.embed_tokens = Int8Embedding(table.num_embeddings, table.embedding_dim, dtype=torch.bfloat16)
    with pytest.raises(FormatError, match="int8 embedding table is not publishable"):
        compressed_state(model, plan)
