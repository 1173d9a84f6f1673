"""Distillation: layer dropping, a loss that goes down, and the compress step that runs it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from autoglm_modeling.folders import load_model_folder
from autoglm_modeling.loading import load_causal_lm
from autoglm_pipelines.distillation import distill, kept_layers, make_student
from autoglm_pipelines.text import tokenize, windows
from tests.support.tiny_models import hamlet_path, tiny_glm
from tests.unit.test_pipeline_steps import result, step, torch_manifest


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_glm(tmp_path_factory.mktemp("t") / "glm", layers=4)


@pytest.mark.parametrize(
    ("total", "keep", "expected"), [(4, 2, [0, 3]), (30, 3, [0, 14, 29]), (4, 4, [0, 1, 2, 3]), (5, 1, [4])]
)
def test_kept_layers_are_evenly_spaced_with_first_and_last(
    total: int, keep: int, expected: list[int]
) -> None:
    assert kept_layers(total, keep) == expected


def test_distillation_lowers_the_loss_and_the_student_generates(teacher_dir: Path, tmp_path: Path) -> None:
    lm = load_causal_lm(teacher_dir, None, cache_dir=tmp_path)
    ids = tokenize(lm.tokenizer, hamlet_path().read_text(), max_tokens=2048)
    batches = windows(ids, length=64, count=8)
    student, layers_of = make_student(lm.model, 2)
    assert layers_of == [0, 3]
    assert student.config.num_hidden_layers == 2
    before = copy.deepcopy(student)
    report = distill(
        lm.model, student, batches, steps=40, temperature_start=4.0, temperature_end=1.0,
        teacher_layer_of=layers_of, learning_rate=3e-3,
    )  # fmt: skip
    assert report.loss_last < report.loss_first
    assert report.student_layers == 2
    assert report.teacher_layers == 4
    assert not torch.equal(before.lm_head.weight, student.lm_head.weight)  # it was trained
    with torch.no_grad():
        out = student.generate(batches[0, :8].unsqueeze(0), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_compress_distils_a_pruned_student_then_quantizes(teacher_dir: Path, tmp_path: Path) -> None:
    compression: dict[str, Any] = {
        "pruning": {"method": "structured-l1", "sparsity": 0.25},
        "distillation": {
            "enabled": True,
            "studentLayers": 2,
            "steps": 6,
            "temperature": {"start": 4.0, "end": 1.0},
        },
    }
    spec, work = torch_manifest(tmp_path, teacher_dir, compression=compression), tmp_path / "work"
    for name in ("fetch", "calibrate", "compress"):
        code, out = step(name, spec, work)
        assert code == 0, out
    metrics = result(work, "compress")["metrics"]
    assert metrics["distillation"]["steps"] == 6
    assert metrics["distillation"]["studentLayers"] == 2
    assert metrics["pruning"]["intermediateSize"]["after"] == 96
    model, _, plan = load_model_folder(work / "compress" / "model")
    assert plan is not None
    assert model.config.num_hidden_layers == 2
    assert len(model.model.layers) == 2
