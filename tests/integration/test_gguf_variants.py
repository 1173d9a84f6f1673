"""A CPU target's variant published as GGUF for llama.cpp: made by llama.cpp's own quantizer,
validated on llama.cpp, its digests in the model card; and when it cannot be GGUF, an ``auto``
target gets torch and the card says why, while a target that asked for llama.cpp fails naming why."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from autoglm_api.validation import load_manifest
from autoglm_core.card import verify
from autoglm_core.variants import target_revisions, variants
from tests.support.llamacpp import needs_llama_cpp
from tests.support.tiny_models import tiny_glm, tiny_llama
from tests.unit.test_pipeline_steps import manifest, result, step

pytestmark = pytest.mark.integration

STEPS = ("fetch", "calibrate", "compress", "validate", "publish")
#: What llama.cpp's quantizer makes of each 2-D weight, per quantization method.
KINDS = {
    "int8-weight-only": "Q8_0",
    "int8-dynamic": "Q8_0",
    "smoothquant-w8a8": "Q8_0",
    "int4-weight-only": "Q4_0",
    "fp16": "F16",
    "bf16": "BF16",
    "none": "F32",
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("src") / "llama", layers=2)


def run_steps(spec: Path, work: Path, names: tuple[str, ...] = STEPS) -> None:
    """Each step by its name in the DAG (``compress-torch``: compress --variant torch)."""
    for name in names:
        kind, _, variant = name.partition("-")
        code, out = step(kind, spec, work, *(("--variant", variant) if variant else ()))
        assert code == 0, out


def tensor_types(path: Path) -> dict[str, str]:
    """Each tensor's GGML type as gguf-py (not our code) reads it."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def oracle_perplexity(path: Path, ids: list[int], window: int) -> float:
    """Perplexity by llama-cpp-python's own ``Llama`` class (``logits_all``), not our context code:
    the same non-overlapping windows validate scores. Flash attention on, as llama.cpp's default
    context (which the server and validate use) turns it on for the CPU: without it a random
    model's Q8_0 perplexity moves by 0.3%."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path), n_ctx=window + 1, logits_all=True, n_threads=2, verbose=False, flash_attn=True
    )
    nll, count = 0.0, 0
    try:
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start : start + window + 1]
            if len(chunk) < 2:
                break
            llm.reset()
            llm.eval(chunk[:-1])
            logits = np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
            nll += float((logz - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
            count += len(chunk) - 1
    finally:
        llm.close()
    return math.exp(nll / count)


def tiny_mistral(folder: Path) -> Path:
    """A tiny model of an architecture the GGUF writer does not know."""
    from transformers import MistralConfig, MistralForCausalLM

    from tests.support.tiny_models import tiny_shape, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    MistralForCausalLM(
        MistralConfig(**tiny_shape(tokenizer, layers=1, tie=True, init_std=0.02))
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@needs_llama_cpp
@pytest.mark.parametrize("architecture", ["llama", "glm"])
def test_a_cpu_target_publishes_gguf_made_and_validated_on_llama_cpp(
    tmp_path: Path, llama: Path, architecture: str
) -> None:
    from autoglm_inference.artifact import choose_engine
    from autoglm_pipelines.text import read_text, tokenize
    from tests.support.tiny_models import hamlet_path, tiny_tokenizer

    source = llama if architecture == "llama" else tiny_glm(tmp_path / "glm")
    spec, work = manifest(tmp_path, source), tmp_path / "work"
    run_steps(spec, work)
    compressed = result(work, "compress")["metrics"]
    assert (compressed["engine"], compressed["gguf"]) == ("llama.cpp", "Q8_0")
    gguf_file = work / "compress" / "model" / "model.gguf"
    reader = gguf.GGUFReader(gguf_file)
    # matrices Q8_0; norms and biases (1-D) stay F32, as llama.cpp's quantizer keeps them
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} == {"Q8_0"}
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 1} == {"F32"}

    report = json.loads((work / "validate" / "validate.json").read_text())
    assert report["engines"] == {"baseline": "torch", "candidate": "llama.cpp"}
    # the tensors' bytes as gguf-py reads them, not the tokenizer's and other metadata
    tensor_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(gguf_file).tensors)
    assert report["candidate"]["weightBytes"] == tensor_bytes < gguf_file.stat().st_size
    # the quality gate's figure is llama.cpp's own perplexity of the weights that will serve
    text = read_text(hamlet_path())
    ids = [int(t) for t in tokenize(tiny_tokenizer(), text, max_tokens=512)]
    assert report["tokens"] == len(ids)
    assert report["candidate"]["quality"] == pytest.approx(oracle_perplexity(gguf_file, ids, 128), rel=1e-6)

    published = work / "publish" / "model"
    card = json.loads((published / "model-card.json").read_text())
    assert card["engine"] == "llama.cpp"
    assert card["format"] == "gguf (Q8_0)"
    assert "engineReason" not in card
    assert not list(published.glob("*.safetensors"))  # one weights file: what llama.cpp loads
    assert card["files"]["model.gguf"] == result(work, "compress")["files"]["model/model.gguf"]
    verify(f"file://{published}", published, None)  # every digest holds
    assert choose_engine(published, "auto") == "llama.cpp"


@needs_llama_cpp
@pytest.mark.parametrize(("method", "kind"), KINDS.items())
def test_each_method_becomes_the_gguf_kind_llama_cpp_makes(
    tmp_path: Path, llama: Path, method: str, kind: str
) -> None:
    spec = manifest(tmp_path, llama, compression={"quantization": {"method": method}})
    work = tmp_path / "work"
    run_steps(spec, work, ("fetch", "calibrate", "compress"))
    assert result(work, "compress")["metrics"]["gguf"] == kind
    types = tensor_types(work / "compress" / "model" / "model.gguf")
    assert types["blk.0.ffn_down.weight"] == kind
    assert types["blk.1.attn_q.weight"] == kind


@needs_llama_cpp
def test_a_retraining_revision_is_judged_on_llama_cpp_against_the_stable_gguf(
    tmp_path: Path, llama: Path
) -> None:
    """A fine-tuned candidate for a llama.cpp target is compared with the stable GGUF artifact on the
    engine that serves both: the validation text's perplexity and the held-out answers."""
    from autoglm_pipelines.text import read_text, tokenize
    from tests.support.tiny_models import hamlet_path, tiny_tokenizer
    from tests.unit.test_finetune import write_dataset

    (tmp_path / "stable").mkdir()
    stable_work = tmp_path / "stable" / "work"
    run_steps(manifest(tmp_path / "stable", llama), stable_work)
    artifact = stable_work / "publish" / "model"
    assert (artifact / "model.gguf").is_file()
    data = write_dataset(tmp_path / "d.jsonl", 40)
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    training = {"dataset": f"file://{data}", "sha256": digest, "epochs": 2, "learningRate": 0.01}
    spec = manifest(tmp_path, llama, training={**training, "against": artifact.as_uri()})
    work = tmp_path / "work"
    run_steps(spec, work, ("fetch", "finetune", "calibrate", "compress"))
    code, out = step("validate", spec, work)  # the verdict may go either way: the figures are the point
    report = json.loads((work / "validate" / "validate.json").read_text())
    assert report["engines"] == {"baseline": "torch", "candidate": "llama.cpp", "stable": "llama.cpp"}
    ids = [int(t) for t in tokenize(tiny_tokenizer(), read_text(hamlet_path()), max_tokens=512)]
    stable_gguf = artifact / "model.gguf"
    assert report["stable"]["quality"] == pytest.approx(oracle_perplexity(stable_gguf, ids, 128), rel=1e-6)
    versus = next(g for g in report["gates"] if g["name"] == "maxQualityLossVsStable")
    assert versus["value"] == pytest.approx(report["candidate"]["quality"] / report["stable"]["quality"] - 1)
    held = report["heldOut"]
    assert held["against"] == "stable"
    assert set(held["answerNll"]) == {"baseline", "stable", "candidate"}
    assert all(math.isfinite(v) and v > 0 for v in held["answerNll"].values())
    assert (code == 0) == all(g["passed"] for g in report["gates"]), out


@needs_llama_cpp
def test_pruning_runs_in_torch_before_the_gguf_is_made(tmp_path: Path, llama: Path) -> None:
    """Heads and MLP channels pruned, then GGUF: llama.cpp loads and validates it."""
    spec = manifest(tmp_path, llama, compression={"pruning": {"method": "structured-l1", "sparsity": 0.5}})
    work = tmp_path / "work"
    run_steps(spec, work, ("fetch", "calibrate", "compress", "validate"))
    assert (
        json.loads((work / "validate" / "validate.json").read_text())["engines"]["candidate"] == "llama.cpp"
    )
    reader = gguf.GGUFReader(work / "compress" / "model" / "model.gguf")
    field = reader.fields["llama.feed_forward_length"]
    config = json.loads((llama / "config.json").read_text())
    assert int(field.parts[field.data[0]][0]) == config["intermediate_size"] // 2
    ffn = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    assert list(ffn.shape)[1] == config["intermediate_size"] // 2


def test_auto_publishes_for_torch_where_gguf_cannot_be_made_and_says_why(tmp_path: Path) -> None:
    source = tiny_mistral(tmp_path / "mistral")
    spec, work = manifest(tmp_path, source), tmp_path / "work"
    run_steps(spec, work)
    compressed = result(work, "compress")["metrics"]
    assert compressed["engine"] == "torch"
    assert "MistralForCausalLM cannot be written as GGUF yet" in compressed["engineReason"]
    card = json.loads((work / "publish" / "model" / "model-card.json").read_text())
    assert (card["engine"], card["engineReason"]) == ("torch", compressed["engineReason"])
    assert card["format"].startswith("compressed-tensors")


@pytest.mark.parametrize(
    ("quantization", "why"),
    [
        ({"method": "int4-weight-only", "algorithm": "gptq"}, "algorithm gptq has no GGUF form"),
        ({"method": "int8-weight-only", "skipModules": ["lm_head"]}, "skipModules"),
    ],
)
def test_what_gguf_cannot_express_keeps_an_auto_target_on_torch(
    tmp_path: Path, llama: Path, quantization: dict[str, Any], why: str
) -> None:
    spec = manifest(tmp_path, llama, compression={"quantization": quantization})
    work = tmp_path / "work"
    run_steps(spec, work, ("fetch", "calibrate", "compress"))
    compressed = result(work, "compress")["metrics"]
    assert compressed["engine"] == "torch"
    assert why in compressed["engineReason"]


def test_a_target_that_asks_for_llama_cpp_fails_naming_why_it_cannot(tmp_path: Path) -> None:
    source = tiny_mistral(tmp_path / "mistral")
    spec = manifest(tmp_path, source, targets=[{"name": "edge", "pool": "kubeedge", "engine": "llama.cpp"}])
    work = tmp_path / "work"
    run_steps(spec, work, ("fetch", "calibrate"))
    code, out = step("compress", spec, work)
    assert code == 1
    assert "engine llama.cpp: " in out
    assert (
        "MistralForCausalLM cannot be written as GGUF yet (supported: LlamaForCausalLM, GlmForCausalLM)"
        in out
    )


@needs_llama_cpp
def test_targets_on_two_engines_get_two_builds_of_one_precision(tmp_path: Path, llama: Path) -> None:
    """A GPU target (torch) and an edge target (llama.cpp) of the same int8: two revisions, two
    formats, each validated on its own engine."""
    targets = [
        {"name": "cloud", "pool": "cloud-gpu", "resources": {"gpu": 1}},
        {"name": "edge", "pool": "kubeedge"},
    ]
    spec = manifest(tmp_path, llama, targets=targets)
    model = load_manifest(str(spec))
    assert [(v.name, v.engine) for v in variants(model.spec)] == [("torch", "torch"), ("", "auto")]
    revisions = target_revisions(model.spec)
    assert revisions["cloud"] != revisions["edge"]
    work = tmp_path / "work"
    run_steps(spec, work, ("fetch", "calibrate", "compress", "compress-torch", "validate", "validate-torch",
                           "publish", "publish-torch"))  # fmt: skip
    assert result(work, "compress-torch")["metrics"]["engine"] == "torch"
    assert result(work, "compress")["metrics"]["engine"] == "llama.cpp"
    torch_report = json.loads((work / "validate-torch" / "validate.json").read_text())
    assert torch_report["engines"]["candidate"] == "torch"
    for name, target in (("publish", "edge"), ("publish-torch", "cloud")):  # each card names its revision
        card = json.loads((work / name / "model" / "model-card.json").read_text())
        assert card["revision"] == revisions[target]


@needs_llama_cpp
def test_a_model_the_gguf_writer_refuses_is_published_for_torch_on_auto_and_fails_on_llama_cpp(
    tmp_path: Path,
) -> None:
    """Dynamic rope scaling has no GGUF form here: only the export finds out (after pruning and
    distillation ran), and an ``auto`` target still gets a validated torch build."""
    source = tiny_llama(tmp_path / "llama", layers=2)
    config = json.loads((source / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (source / "config.json").write_text(json.dumps(config))
    spec, work = manifest(tmp_path, source), tmp_path / "work"
    run_steps(spec, work)
    compressed = result(work, "compress")["metrics"]
    assert compressed["engine"] == "torch"
    assert "GGUF export failed: " in compressed["engineReason"]
    assert "rope scaling 'dynamic'" in compressed["engineReason"]
    assert not (work / "compress" / "model" / "model.gguf").exists()
    card = json.loads((work / "publish" / "model" / "model-card.json").read_text())
    assert card["engineReason"] == compressed["engineReason"]

    asked = manifest(tmp_path, source, targets=[{"name": "edge", "pool": "kubeedge", "engine": "llama.cpp"}])
    code, out = step("compress", asked, work)
    assert code == 1
    assert "engine llama.cpp: " in out
    assert "rope scaling 'dynamic' is not written to GGUF yet" in out


@needs_llama_cpp
def test_a_glm_with_pruned_heads_stays_on_torch_where_chatglm_cannot_hold_it(tmp_path: Path) -> None:
    """llama.cpp's chatglm layout ties the heads' width to hidden_size: an auto target gets torch."""
    source = tiny_glm(tmp_path / "glm")
    spec = manifest(tmp_path, source, compression={"pruning": {"method": "structured-l1", "sparsity": 0.5}})
    work = tmp_path / "work"
    run_steps(spec, work, ("fetch", "calibrate", "compress"))
    compressed = result(work, "compress")["metrics"]
    assert compressed["engine"] == "torch"
    assert "chatglm layout needs attention heads x head_dim = hidden_size" in compressed["engineReason"]


@needs_llama_cpp
def test_compress_is_redone_when_only_the_engine_changes(tmp_path: Path, llama: Path) -> None:
    """One target asking for torch, then for llama.cpp: both builds are named "" (nothing to tell
    apart in the spec), so only the engine in compress's reuse key keeps the torch build from being
    reused as the GGUF one."""
    work = tmp_path / "work"
    on_torch = manifest(tmp_path, llama, targets=[{"name": "edge", "pool": "kubeedge", "engine": "torch"}])
    run_steps(on_torch, work, ("fetch", "calibrate", "compress"))
    assert result(work, "compress")["metrics"]["engine"] == "torch"
    on_llama = manifest(
        tmp_path, llama, targets=[{"name": "edge", "pool": "kubeedge", "engine": "llama.cpp"}]
    )
    code, out = step("compress", on_llama, work)
    assert code == 0, out
    assert "reused" not in out
    assert result(work, "compress")["metrics"]["engine"] == "llama.cpp"
