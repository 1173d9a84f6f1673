"""The accuracy-budget search: feasibility, the Pareto front, and the step that feeds compress."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from autoglm_modeling.loading import load_causal_lm
from autoglm_pipelines.search import Trial, _dominates, search
from autoglm_pipelines.text import tokenize, windows
from tests.support.tiny_models import hamlet_path, tiny_glm
from tests.unit.test_pipeline_steps import result, step, torch_manifest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_glm(tmp_path_factory.mktemp("src") / "glm")


def test_search_returns_a_feasible_non_dominated_choice(tiny: Path, tmp_path: Path) -> None:
    lm = load_causal_lm(tiny, None, cache_dir=tmp_path)
    ids = tokenize(lm.tokenizer, hamlet_path().read_text(), max_tokens=768)
    outcome = search(
        lm.model,
        ids[:512],
        window=128,
        tolerable_loss=0.2,
        max_trials=6,
        calibration=windows(ids[512:], length=64, count=2),
        decode_tokens=4,
    )
    assert len(outcome.trials) == 6
    assert outcome.chosen is not None
    assert outcome.chosen.feasible
    assert outcome.chosen.quality_loss <= 0.2
    for trial in outcome.pareto:
        assert trial.feasible
        assert not any(_dominates(other, trial) for other in outcome.trials if other.feasible)
    assert outcome.chosen in outcome.pareto
    assert json.loads(json.dumps(outcome.to_json()))["chosen"]["config"]["quantization"]["method"]


def test_dominance_needs_better_on_one_objective_and_no_worse_on_the_other() -> None:
    def t(size: float, speed: float) -> Trial:
        return Trial(
            number=0, config={}, quality_loss=0.0, size_reduction=size, decode_speedup=speed, feasible=True
        )

    assert _dominates(t(4, 2), t(3, 2))
    assert not _dominates(t(4, 1), t(3, 2))
    assert not _dominates(t(3, 2), t(3, 2))


def test_search_step_feeds_its_choice_to_compress(tiny: Path, tmp_path: Path) -> None:
    compression: dict[str, Any] = {"search": {"enabled": True, "maxTrials": 4, "tolerableLoss": 0.3}}
    spec, work = torch_manifest(tmp_path, tiny, compression=compression), tmp_path / "work"
    for name in ("fetch", "calibrate", "search", "compress"):
        code, out = step(name, spec, work)
        assert code == 0, out
    chosen = json.loads((work / "search" / "search.json").read_text())["chosen"]
    applied = result(work, "compress")["parameters"]
    assert applied["quantization"] == chosen["config"]["quantization"]
    assert applied["pruning"] == chosen["config"]["pruning"]


def test_search_without_a_feasible_configuration_fails_with_a_reason(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a random tiny model a quantized trial can score a loss <= 0 by chance; make every trial
    # lose 10% so the outcome does not depend on the machine's rounding.
    monkeypatch.setattr("autoglm_pipelines.search.quality_loss", lambda metric, base, cand: 0.1)
    compression: dict[str, Any] = {"search": {"enabled": True, "maxTrials": 3, "tolerableLoss": 1e-9}}
    spec, work = torch_manifest(tmp_path, tiny, compression=compression), tmp_path / "work"
    assert step("fetch", spec, work)[0] == 0
    assert step("calibrate", spec, work)[0] == 0
    code, out = step("search", spec, work)
    assert code == 1
    assert "no configuration kept quality loss within 1e-09 in 3 trials" in out
    assert (work / "search" / "search.json").is_file()
