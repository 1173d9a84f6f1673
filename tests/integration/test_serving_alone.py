"""The serving path needs no pipeline: the server starts, loads a published quantized artifact and
answers, in a process where ``autoglm_pipelines`` and ``autoglm_operator`` cannot be imported."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from autoglm_inference.process import ServerProcess
from autoglm_modeling.folders import load_model_folder, save_model_folder
from autoglm_modeling.quantization import Int8WeightOnlyLinear, quantize_model
from tests.support.tiny_models import tiny_glm, with_model_card

pytestmark = pytest.mark.integration

HIDDEN = ("autoglm_pipelines", "autoglm_operator", "optuna", "hera")
# Imported by Python at start-up from PYTHONPATH: a finder that refuses the hidden packages, and a
# record of every module the server imported by the time it exits.
SITECUSTOMIZE = f"""
import atexit, json, os, sys

HIDDEN = {HIDDEN!r}


class _Hidden:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)", name=name)
        return None


sys.meta_path.insert(0, _Hidden())


def _write_modules():
    with open(os.environ["AUTOGLM_TEST_MODULES_FILE"], "w") as out:
        json.dump(sorted(sys.modules), out)


atexit.register(_write_modules)
"""


def test_the_server_serves_a_quantized_artifact_with_the_pipeline_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tiny_glm(tmp_path / "source", init_std=0.3, seed=5)
    model, _, _ = load_model_folder(source)
    plan = quantize_model(model, "int8-weight-only")
    artifact = tmp_path / "artifact"
    save_model_folder(model, AutoTokenizer.from_pretrained(source), artifact, plan)
    with_model_card(artifact, "rev-alone")
    hider = tmp_path / "hider"
    hider.mkdir()
    (hider / "sitecustomize.py").write_text(SITECUSTOMIZE)
    modules_file = tmp_path / "modules.json"
    monkeypatch.setenv("PYTHONPATH", str(hider))
    monkeypatch.setenv("AUTOGLM_TEST_MODULES_FILE", str(modules_file))

    server = ServerProcess("alone", str(artifact), log=tmp_path / "server.log").wait_ready()
    try:
        r = httpx.post(
            f"{server.url}/openai/v1/completions",
            json={"model": "alone", "prompt": "To be, or not", "max_tokens": 6, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-autoglm-revision"] == "rev-alone"
        assert r.json()["usage"]["completion_tokens"] > 0
    finally:
        assert server.stop() == 0, (tmp_path / "server.log").read_text()[-3000:]

    imported = set(json.loads(modules_file.read_text()))
    assert any(isinstance(m, Int8WeightOnlyLinear) for m in model.modules())  # it served quantized weights
    assert "autoglm_modeling.quantization" in imported
    assert "autoglm_inference.server" in imported
    assert not {m for m in imported if m.partition(".")[0] in HIDDEN}
