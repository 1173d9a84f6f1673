"""Pipeline steps from the CLI on a tiny GLM: outputs, STEP.json, gates, reuse and failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from autoglm_modeling import cpugemm
from autoglm_modeling.folders import load_model_folder
from autoglm_operator.cli.main import cli
from tests.support.roundtrip import fp32_logits
from tests.support.tiny_models import tiny_glm

STEPS = ("fetch", "calibrate", "compress", "validate", "publish")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_glm(tmp_path_factory.mktemp("src") / "glm")


def manifest(tmp_path: Path, source: Path, *, engine: str | None = None, **spec: Any) -> Path:
    """The tiny manifest: one cloud-cpu target (``engine`` left to auto unless given)."""
    doc: dict[str, Any] = {
        "apiVersion": "autoglm.io/v1alpha1",
        "kind": "AutoGLMModel",
        "metadata": {"name": "tiny", "namespace": "ml"},
        "spec": {
            "source": {"uri": f"file://{source}"},
            "targets": [{"name": "local", **({"engine": engine} if engine else {})}],
            "calibration": {"samples": 4, "sequenceLength": 64},
            "validation": {
                "maxTokens": 512,
                "sequenceLength": 128,
                # the tiny GLM is mostly its table (kept bf16) and head: 1.7x, not a real model's 2.8x
                "gates": {"maxQualityLoss": 0.5, "maxP95LatencyMs": 10_000, "minSizeReduction": 1.5},
            },
            **spec,
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def torch_manifest(tmp_path: Path, source: Path, **spec: Any) -> Path:
    """The tiny manifest on the torch engine: what these tests check is torch's artifact (where
    llama.cpp is installed an ``auto`` target would get GGUF)."""
    return manifest(tmp_path, source, engine="torch", **spec)


def step(name: str, spec: Path, workdir: Path, *extra: str) -> tuple[int, str]:
    args = ["pipeline", name, "--spec", str(spec), "--workdir", str(workdir), "--decode-tokens", "4", *extra]
    result = CliRunner().invoke(cli, [*args, "--cache-dir", str(workdir.parent / "cache")])
    return result.exit_code, result.output


def result(workdir: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((workdir / name / "STEP.json").read_text())
    return data


def test_every_step_runs_writes_its_result_and_publishes_a_loadable_artifact(
    tmp_path: Path, source: Path
) -> None:
    spec, work = torch_manifest(tmp_path, source), tmp_path / "work"
    for name in STEPS:
        code, out = step(name, spec, work)
        assert code == 0, out
        assert f"{name}: Succeeded" in out
        assert result(work, name)["status"] == "Succeeded"
    assert result(work, "compress")["metrics"]["sizeReduction"] > 1.5  # the tiny GLM: mostly its bf16 table
    assert "model/model.safetensors" in result(work, "compress")["files"]
    report = json.loads((work / "validate" / "validate.json").read_text())
    assert report["metric"] == "perplexity"
    assert report["passed"] is True
    for side in ("baseline", "candidate"):
        assert set(report[side]) >= {
            "quality",
            "weightBytes",
            "decodeTokensPerSecond",
            "p95TokenLatencyMs",
            "joulesPerToken",
        }
    assert [g["name"] for g in report["gates"]] == ["maxQualityLoss", "maxP95LatencyMs", "minSizeReduction"]

    published = work / "publish" / "model"
    card = json.loads((published / "model-card.json").read_text())
    assert card["source"]["uri"] == f"file://{source}"
    assert set(card["lineage"]) == {"fetch", "compress", "calibrate", "validate"}
    assert "dequantized on every forward" in card["execution"]["cuda"]  # where no kernel: said, not hidden
    assert card["format"].startswith("compressed-tensors (pack-quantized")
    assert card["files"]["model.safetensors"] == result(work, "compress")["files"]["model/model.safetensors"]
    served, tokenizer, plan = load_model_folder(published)
    compressed, _, _ = load_model_folder(work / "compress" / "model")
    ids = tokenizer("Something is rotten in the state of Denmark", return_tensors="pt").input_ids
    assert plan is not None
    assert plan.method == "int8-weight-only"
    with torch.no_grad():
        assert torch.equal(served(ids).logits, compressed(ids).logits)


def test_rerun_reuses_unchanged_steps_and_redoes_changed_or_tampered_ones(
    tmp_path: Path, source: Path
) -> None:
    spec, work = torch_manifest(tmp_path, source), tmp_path / "work"
    for name in ("fetch", "calibrate", "compress"):
        assert step(name, spec, work)[0] == 0
    code, out = step("compress", spec, work)
    assert (code, "reused" in out) == (0, True)

    weights = work / "compress" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    code, out = step("compress", spec, work)
    assert (code, "reused" in out) == (0, False)  # the files no longer match their hashes: redone

    int4 = torch_manifest(
        tmp_path, source, compression={"quantization": {"method": "int4-weight-only", "groupSize": 32}}
    )
    code, out = step("compress", int4, work)
    assert (code, "reused" in out) == (0, False)
    assert result(work, "compress")["parameters"]["quantization"]["method"] == "int4-weight-only"


def test_impossible_gate_fails_validate_and_keeps_the_report(tmp_path: Path, source: Path) -> None:
    gates = {"maxQualityLoss": 0.5, "maxP95LatencyMs": 10_000, "minSizeReduction": 100.0}
    spec = torch_manifest(
        tmp_path, source, validation={"maxTokens": 512, "sequenceLength": 128, "gates": gates}
    )
    work = tmp_path / "work"
    for name in ("fetch", "calibrate", "compress"):
        assert step(name, spec, work)[0] == 0
    code, out = step("validate", spec, work)
    assert code == 1
    assert "gate failed: minSizeReduction FAILED" in out
    assert "(must be >= 100)" in out
    report = json.loads((work / "validate" / "validate.json").read_text())
    assert report["passed"] is False
    failed = [g for g in report["gates"] if not g["passed"]]
    assert [g["name"] for g in failed] == ["minSizeReduction"]
    assert result(work, "validate")["status"] == "Failed"
    code, out = step("publish", spec, work)
    assert code == 1
    assert "validate has not passed" in out


@pytest.mark.parametrize("method", ["int8-dynamic", "smoothquant-w8a8", "int4-weight-only"])
def test_other_methods_compress_and_reload(tmp_path: Path, source: Path, method: str) -> None:
    quantization: dict[str, Any] = {"method": method}
    if method.startswith("int4"):
        quantization["groupSize"] = 32
    spec, work = (
        torch_manifest(tmp_path, source, compression={"quantization": quantization}),
        tmp_path / "work",
    )
    for name in ("fetch", "calibrate", "compress"):
        code, out = step(name, spec, work)
        assert code == 0, out
    compressed = result(work, "compress")
    assert compressed["parameters"]["quantization"]["method"] == method
    assert compressed["metrics"]["sizeReduction"] > 1.9  # the tiny GLM: mostly its bf16 table
    if method == "smoothquant-w8a8":
        assert compressed["metrics"]["smoothedGroups"] == 6  # 2 layers x (q/k/v, gate/up, down)
        assert "model/smoothquant-activations.safetensors" in compressed["files"]
    _, _, plan = load_model_folder(work / "compress" / "model")
    assert plan is not None
    assert plan.method == method


@pytest.mark.parametrize(
    ("pruning", "expected"),
    [
        ({"method": "structured-l1", "sparsity": 0.5}, {"intermediateSize": 64, "keyValueHeads": 1}),
        ({"method": "semi-structured-2of4", "sparsity": 0.5}, {"pattern": "2:4"}),
    ],
)
def test_pruning_runs_before_quantization(
    tmp_path: Path, source: Path, pruning: dict[str, Any], expected: dict[str, Any]
) -> None:
    spec = torch_manifest(tmp_path, source, compression={"pruning": pruning})
    work = tmp_path / "work"
    for name in ("fetch", "calibrate", "compress"):
        code, out = step(name, spec, work)
        assert code == 0, out
    report = result(work, "compress")["metrics"]["pruning"]
    for key, value in expected.items():
        assert (report[key]["after"] if isinstance(report[key], dict) else report[key]) == value
    model, _, plan = load_model_folder(work / "compress" / "model")
    assert plan is not None
    if pruning["method"] == "structured-l1":
        assert model.config.intermediate_size == 64
        assert model.get_submodule("model.layers.0.mlp.down_proj").in_features == 64
        assert result(work, "compress")["metrics"]["sizeReduction"] > 2.5


def test_bad_source_fails_fetch_with_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    spec, work = torch_manifest(tmp_path, empty), tmp_path / "work"
    code, out = step("fetch", spec, work)
    assert code == 1
    assert "no config.json" in out
    missing = torch_manifest(tmp_path, tmp_path / "nope")
    code, out = step("fetch", missing, work)
    assert code == 1
    assert "does not exist" in out


def test_invalid_manifest_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: autoglm.io/v1alpha1\nkind: AutoGLMModel\nmetadata: {name: x}\nspec: {}\n")
    code, out = step("fetch", bad, tmp_path / "work")
    assert code == 2
    assert "invalid AutoGLMModel" in out


def test_a_download_that_fails_exits_75_so_argo_retries_it(tmp_path: Path) -> None:
    # Port 1 on loopback refuses at once: a transient failure, unlike a missing local file (exit 1).
    spec = tmp_path / "m.yaml"
    doc = yaml.safe_load(torch_manifest(tmp_path, tmp_path).read_text())
    doc["spec"]["source"]["uri"] = "http://127.0.0.1:1/model.gguf"
    spec.write_text(yaml.safe_dump(doc))
    code, out = step("fetch", spec, tmp_path / "work")
    assert code == 75
    assert "transient" in out
    assert "download failed" in out


def test_compress_reruns_when_the_calibration_it_reads_changes(tmp_path: Path, source: Path) -> None:
    compression = {"quantization": {"method": "smoothquant-w8a8"}}
    spec, work = torch_manifest(tmp_path, source, compression=compression), tmp_path / "work"
    for name in ("fetch", "calibrate", "compress"):
        assert step(name, spec, work)[0] == 0
    fewer = torch_manifest(
        tmp_path, source, compression=compression, calibration={"samples": 1, "sequenceLength": 32}
    )
    code, out = step("compress", fewer, work)
    assert (code, "reused" in out) == (0, False)


def test_publish_to_an_output_that_was_deleted_is_redone(tmp_path: Path, source: Path) -> None:
    spec, work, out_dir = torch_manifest(tmp_path, source), tmp_path / "work", tmp_path / "served"
    for name in STEPS:
        assert step(name, spec, work, "--output", str(out_dir))[0] == 0
    assert (out_dir / "model-card.json").is_file()
    code, _ = step("publish", spec, work, "--output", str(out_dir), "--publish-baseline")
    assert code == 0
    # beside the artifact under its own name: never a folder another run's --output shares
    assert (tmp_path / "served-baseline" / "model-card.json").is_file()
    assert not (tmp_path / "baseline").exists()
    shutil.rmtree(out_dir)
    code, out = step("publish", spec, work, "--output", str(out_dir))
    assert (code, "reused" in out) == (0, False)
    assert (out_dir / "model-card.json").is_file()


@pytest.mark.skipif(not cpugemm.available(), reason="fp32 activations run on AutoGLM's CPU kernel")
def test_plain_transformers_loads_the_compressed_folder_with_the_weights_autoglm_validated(
    tmp_path: Path, source: Path
) -> None:
    spec, work = torch_manifest(tmp_path, source), tmp_path / "work"
    for name in ("fetch", "calibrate", "compress"):
        assert step(name, spec, work)[0] == 0
    folder = work / "compress" / "model"
    ours, tokenizer, _ = load_model_folder(folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer("Something is rotten in the state of Denmark", return_tensors="pt").input_ids
    with torch.no_grad():
        want = theirs(ids).logits.float()
    assert torch.allclose(fp32_logits(ours, ids), want, rtol=1e-4, atol=1e-4)


def test_bf16_is_a_standard_checkpoint_loaded_in_bf16(tmp_path: Path, source: Path) -> None:
    spec = torch_manifest(tmp_path, source, compression={"quantization": {"method": "bf16"}})
    work = tmp_path / "work"
    for name in ("fetch", "calibrate", "compress"):
        assert step(name, spec, work)[0] == 0
    model, _, plan = load_model_folder(work / "compress" / "model")
    assert plan is not None
    assert plan.method == "bf16"
    assert model.dtype == torch.bfloat16
    assert AutoModelForCausalLM.from_pretrained(work / "compress" / "model").config.hidden_size == 64


def test_a_truncated_checkpoint_fails_the_next_step_with_one_line(tmp_path: Path, source: Path) -> None:
    spec, work = torch_manifest(tmp_path, source), tmp_path / "work"
    assert step("fetch", spec, work)[0] == 0
    weights = work / "fetch" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, out = step("compress", spec, work)
    assert code == 1
    assert "compress: failed:" in out
    assert "Traceback" not in out
    assert result(work, "compress")["status"] == "Failed"


def test_gptq_uses_the_hessians_calibrate_recorded_on_the_source_model(tmp_path: Path, source: Path) -> None:
    gptq = {"quantization": {"method": "int4-weight-only", "groupSize": 32, "algorithm": "gptq"}}
    spec, work = torch_manifest(tmp_path, source, compression=gptq), tmp_path / "work"
    for name in ("fetch", "calibrate", "compress"):
        code, out = step(name, spec, work)
        assert code == 0, out
    assert "hessians.safetensors" in result(work, "calibrate")["files"]
    assert (
        result(work, "calibrate")["metrics"]["hessians"] == 2 * 4 + 1
    )  # per layer qkv, o, gate_up, down; the head
    _, _, plan = load_model_folder(work / "compress" / "model")
    assert plan is not None
    int4 = [n for n, kind in plan.modules.items() if kind == "int4-weight-only"]
    assert int4
    assert plan.rounding == dict.fromkeys(int4, "gptq")

    rtn = torch_manifest(
        tmp_path, source, compression={"quantization": {"method": "int4-weight-only", "groupSize": 32}}
    )
    assert step("calibrate", rtn, work)[0] == 0  # round to nearest needs no Hessians
    assert "hessians.safetensors" not in result(work, "calibrate")["files"]


def test_compress_without_calibration_says_which_step_to_run(tmp_path: Path, source: Path) -> None:
    spec, work = torch_manifest(tmp_path, source), tmp_path / "work"
    assert step("fetch", spec, work)[0] == 0
    code, out = step("compress", spec, work)
    assert code == 1
    assert "run the calibrate step first" in out


def test_publish_baseline_serves_the_uncompressed_source_under_its_own_revision(
    tmp_path: Path, source: Path
) -> None:
    from autoglm_api.validation import load_manifest
    from autoglm_core.card import verify
    from autoglm_core.revision import artifact_revision, source_revision

    spec, work = torch_manifest(tmp_path, source), tmp_path / "work"
    for name in STEPS:
        assert step(name, spec, work)[0] == 0
    assert "baseline" not in result(work, "publish")["metrics"]  # only when asked for
    code, out = step("publish", spec, work, "--publish-baseline")
    assert (code, "reused" in out) == (0, False)  # asking for it redoes publish
    metrics = result(work, "publish")["metrics"]
    model = load_manifest(str(spec))
    baseline = Path(metrics["baseline"])
    assert baseline == work / "publish" / "baseline"
    assert metrics["baselineRevision"] == source_revision(model.spec) != artifact_revision(model.spec)
    assert metrics["baselineRevision"].startswith("src-")
    artifact = verify(str(baseline), baseline)  # what the server checks before it loads it
    assert artifact.revision == metrics["baselineRevision"]
    assert artifact.card is not None
    assert artifact.card["role"] == "baseline"
    assert artifact.card["validation"]["baseline"]["quality"] > 0
    assert metrics["baselineBytes"] > metrics["artifactBytes"] > 0  # fp32 against int8
    # the weights are the fetched source's, bit for bit (hard-linked, not converted again)
    fetched = work / "fetch" / "model" / "model.safetensors"
    assert (baseline / "model.safetensors").read_bytes() == fetched.read_bytes()
    served, tokenizer, plan = load_model_folder(baseline)
    original = AutoModelForCausalLM.from_pretrained(source)
    ids = tokenizer("Something is rotten", return_tensors="pt").input_ids
    assert plan is None
    with torch.no_grad():
        assert torch.allclose(served(ids).logits, original(ids).logits)
    code, out = step("publish", spec, work, "--publish-baseline")
    assert (code, "reused" in out) == (0, True)
    (baseline / "model.safetensors").unlink()  # the baseline was tampered with: redone
    code, out = step("publish", spec, work, "--publish-baseline")
    assert (code, "reused" in out) == (0, False)
    # fetch run again writes a fresh folder: the published baseline's files are not rewritten
    before = (baseline / "model.safetensors").stat().st_ino
    (work / "fetch" / "STEP.json").unlink()
    assert step("fetch", spec, work)[0] == 0
    assert (baseline / "model.safetensors").stat().st_ino == before
    assert verify(str(baseline), baseline).revision == metrics["baselineRevision"]
