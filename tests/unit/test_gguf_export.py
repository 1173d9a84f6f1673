"""GGUF export, checked against transformers' own GGUF loader (an oracle outside our writer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoglm_modeling.gguf_export import GGUFExportError, export_gguf, gguf_kind
from autoglm_modeling.loading import TRANSFORMERS_LOCK
from tests.support.tiny_models import tiny_glm, tiny_llama

TEXT = "Something is rotten in the state of Denmark. To be, or not to be"


def logits(folder: Path, gguf_file: str | None, ids: torch.Tensor) -> torch.Tensor:
    with TRANSFORMERS_LOCK:
        if gguf_file:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits  # type: ignore[no-any-return]


@pytest.mark.parametrize("tie", [True, False])
def test_an_f32_export_reads_back_through_transformers_with_the_same_logits(
    tmp_path: Path, tie: bool
) -> None:
    source = tiny_llama(tmp_path / "src", tie=tie, seed=1)
    out = export_gguf(source, tmp_path / "out" / "model.gguf", dtype="F32")
    assert gguf_kind(out) == "F32"
    ids = AutoTokenizer.from_pretrained(source)(TEXT, return_tensors="pt")["input_ids"]
    # transformers un-permutes q/k on load: equal logits mean the permutation and names are llama.cpp's.
    assert torch.equal(logits(source, None, ids), logits(out.parent, out.name, ids))


def test_an_f16_export_is_half_the_size_and_close(tmp_path: Path) -> None:
    source = tiny_llama(tmp_path / "src", seed=2)
    f32 = export_gguf(source, tmp_path / "f32" / "model.gguf", dtype="F32")
    f16 = export_gguf(source, tmp_path / "f16" / "model.gguf", dtype="F16")
    assert gguf_kind(f16) == "F16"
    assert f16.stat().st_size < 0.6 * f32.stat().st_size
    ids = AutoTokenizer.from_pretrained(source)(TEXT, return_tensors="pt")["input_ids"]
    with TRANSFORMERS_LOCK:
        rounded = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    for parameter in rounded.parameters():
        if parameter.ndim > 1:  # matrices are written F16, norms stay F32 (as llama.cpp's converter does)
            parameter.data = parameter.data.half().float()
    with torch.no_grad():
        expected = rounded(ids).logits
    assert torch.equal(expected, logits(f16.parent, f16.name, ids))


def test_the_tokenizer_written_from_tokenizer_json_tokenizes_the_same(tmp_path: Path) -> None:
    source = tiny_llama(tmp_path / "src")
    out = export_gguf(source, tmp_path / "out" / "model.gguf", dtype="F16")
    ours = AutoTokenizer.from_pretrained(source)
    theirs = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)  # built from the GGUF fields
    assert theirs(TEXT)["input_ids"] == ours(TEXT)["input_ids"]
    assert theirs.eos_token == ours.eos_token


def test_an_architecture_it_does_not_know_is_refused_naming_what_is_supported(tmp_path: Path) -> None:
    import json

    source = tiny_llama(tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        GGUFExportError,
        match=r"MistralForCausalLM cannot be written as GGUF yet; supported: LlamaForCausalLM, GlmForCausalLM",
    ):
        export_gguf(source, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_a_glm_is_written_in_llama_cpps_chatglm_layout(tmp_path: Path) -> None:
    """Half of each head rotated, the fused gate/up kept as one ffn_up of twice the width, the
    attention biases, and the tied output written out (chatglm reads no tied embedding)."""
    import gguf

    source = tiny_glm(tmp_path / "glm")
    out = export_gguf(source, tmp_path / "model.gguf", dtype="F32")
    reader = gguf.GGUFReader(out)
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "chatglm"
    rope = reader.fields["chatglm.rope.dimension_count"]
    assert int(rope.parts[rope.data[0]][0]) == 8  # head_dim 16 x partial_rotary_factor 0.5
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert shapes["blk.0.ffn_up.weight"] == [64, 256]  # gate and up, 2 x intermediate_size 128
    assert shapes["blk.0.attn_q.bias"] == [64]
    assert shapes["output.weight"] == shapes["token_embd.weight"]


def test_a_quantized_folder_is_refused(tmp_path: Path) -> None:
    import json

    source = tiny_llama(tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"format": "pack-quantized"}
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(GGUFExportError, match="already quantized"):
        export_gguf(source, tmp_path / "model.gguf")


def test_a_failed_export_leaves_no_file_behind(tmp_path: Path) -> None:
    source = tiny_llama(tmp_path / "src")
    (source / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(Exception):  # noqa: B017, PT011  (safetensors' own error)
        export_gguf(source, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()
