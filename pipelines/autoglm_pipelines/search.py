"""Accuracy-budget search over compression settings, in the spirit of Intel Neural Compressor's tuning.

Optuna's TPE sampler proposes a quantization method, an int4 group size, modules to keep in higher
precision (per-layer fallback) and a structured-pruning sparsity. Each trial compresses a copy of
the model and measures relative quality loss, size reduction and decode speed. The two objectives
(size reduction, decode speed) are maximised subject to ``quality loss <= tolerableLoss`` (an
Optuna constraint). A trial whose first evaluation windows already exceed twice the budget stops
there. The result is the Pareto front of feasible trials and, chosen from it, the smallest model,
ties broken by speed.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import optuna
import torch
from pydantic import Field
from torch import nn

from autoglm_core.camel import CamelModel
from autoglm_modeling.quantization import (
    Int4Solver,
    QuantizationPlan,
    quantize_model,
    run_activations_in_fp32,
    weight_bytes,
)
from autoglm_pipelines.calibration import Statistics, collect_input_absmax
from autoglm_pipelines.distillation import distill, drop_layers
from autoglm_pipelines.evaluation import decode_benchmark, perplexity
from autoglm_pipelines.gates import quality_loss
from autoglm_pipelines.gptq import gptq_int4
from autoglm_pipelines.pruning import prune_2of4, prune_structured_l1

METHODS = ("int8-weight-only", "int4-weight-only", "smoothquant-w8a8", "int8-dynamic")
GROUP_SIZES = (32, 64, 128)
FALLBACKS: dict[str, list[str]] = {"none": [], "lm_head": ["lm_head"], "down_proj": ["down_proj"]}
SPARSITIES = (0.0, 0.1, 0.2)
#: Evaluated first, as Neural Compressor's tuning starts from default recipes: TPE then explores
#: around known points instead of spending the budget rediscovering them.
STARTING_POINTS: list[dict[str, Any]] = [
    {"method": "int8-weight-only", "fallback": "none", "sparsity": 0.0},
    {"method": "int4-weight-only", "groupSize": 32, "fallback": "none", "sparsity": 0.0},
    {"method": "smoothquant-w8a8", "fallback": "none", "sparsity": 0.0},
]
#: Windows scored before a trial may be cut short.
EARLY_WINDOWS = 1


class Trial(CamelModel):
    number: int
    config: dict[str, Any]
    quality_loss: float
    size_reduction: float
    decode_speedup: float
    feasible: bool
    cut_early: bool = False


class SearchResult(CamelModel):
    chosen: Trial | None
    pareto: list[Trial]
    trials: list[Trial] = Field(default_factory=list)


class GptqSolver:
    """GPTQ with one layer's Hessian, as ``quantize_model`` calls an int4 solver."""

    name = "gptq"

    def __init__(self, hessian: torch.Tensor) -> None:
        self.hessian = hessian

    def __call__(
        self, weight: torch.Tensor, group_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return gptq_int4(weight, self.hessian, group_size)


def compression_config(
    method: str, group_size: int | None, fallback: str, sparsity: float, keep: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A trial's settings in the shape of ``spec.compression`` (camelCase), ready to apply.

    ``keep``: modules the user keeps in higher precision in every trial (``skipModules``).
    """
    quantization: dict[str, Any] = {"method": method, "skipModules": sorted({*FALLBACKS[fallback], *keep})}
    if method == "int4-weight-only":
        quantization["groupSize"] = group_size
    pruning = {"method": "structured-l1" if sparsity > 0 else "none", "sparsity": sparsity}
    return {"quantization": quantization, "pruning": pruning}


def apply_config(
    model: nn.Module,
    config: dict[str, Any],
    calibration: torch.Tensor | None,
    alpha: float,
    statistics: Statistics | None = None,
) -> tuple[QuantizationPlan, dict[str, Any]]:
    """Compress ``model`` in place as ``config`` (``spec.compression``'s shape) says.

    Pruning first; then distillation from the unpruned float model (the teacher) on the
    ``calibration`` windows; then quantization. ``statistics`` are the calibrate step's, recorded
    once on the source model: SmoothQuant's activation ranges and GPTQ's Hessians come from them
    while the model's layers are still the source's. After pruning or distillation the ranges are
    measured again on the student (``calibration`` windows), and a layer whose inputs changed shape
    is rounded to nearest. Returns the quantization plan and a report of the pruning and
    distillation (and, for SmoothQuant, the ranges the migration used, under ``smoothingAbsmax``).
    """
    distillation = config.get("distillation") or {}
    teacher = copy.deepcopy(model) if distillation.get("enabled") else None
    pruning: dict[str, Any] = {}
    distilled: dict[str, Any] = {}
    if config["pruning"]["method"] == "structured-l1":
        pruning = prune_structured_l1(model, config["pruning"]["sparsity"])
    elif config["pruning"]["method"] == "semi-structured-2of4":
        pruning = prune_2of4(model)
    if teacher is not None:
        if calibration is None:
            raise ValueError("distillation needs calibration data")
        kept = (
            drop_layers(model, distillation["studentLayers"]) if distillation.get("studentLayers") else None
        )
        layers_of = kept if kept is not None else list(range(int(getattr(model, "config").num_hidden_layers)))  # noqa: B009
        temperature = distillation.get("temperature", {})
        report = distill(
            teacher,
            model,
            calibration,
            steps=int(distillation.get("steps", 500)),
            temperature_start=float(temperature.get("start", 10.0)),
            temperature_end=float(temperature.get("end", 1.0)),
            teacher_layer_of=layers_of,
        )
        distilled = report.to_json()
        del teacher
    q = config["quantization"]
    changed = bool(pruning) or bool(distilled)
    absmax = None
    if q["method"] == "smoothquant-w8a8":
        if statistics is not None and not changed:
            absmax = statistics.absmax
        elif calibration is not None:
            absmax, _ = collect_input_absmax(model, calibration)
        else:
            raise ValueError("smoothquant-w8a8 needs calibration data")
    solvers: dict[str, Int4Solver] = {}
    if q.get("algorithm", "rtn") == "gptq":
        if statistics is None or not statistics.hessians:
            raise ValueError(
                "algorithm gptq needs the calibration inputs' Hessians (the calibrate step records them)"
            )
        for name, module in model.named_modules():
            h = statistics.hessians.get(name)
            if isinstance(module, nn.Linear) and h is not None and h.shape[0] == module.in_features:
                solvers[name] = GptqSolver(h)
    plan = quantize_model(
        model,
        q["method"],
        skip_modules=list(q.get("skipModules", [])),
        group_size=q.get("groupSize"),
        activation_absmax=absmax,
        smoothing_alpha=alpha,
        int4_solvers=solvers,
    )
    return plan, {"pruning": pruning, "distillation": distilled, "smoothingAbsmax": absmax}


def search(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    window: int,
    tolerable_loss: float,
    max_trials: int,
    calibration: torch.Tensor | None,
    statistics: Statistics | None = None,
    skip_modules: tuple[str, ...] = (),
    smoothing_alpha: float = 0.7,
    decode_tokens: int = 32,
    seed: int = 0,
    progress: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """Run the search on ``model`` (left unchanged) scored on token ids ``ids``."""
    base_quality = perplexity(model, ids, window=window)
    base_bytes = weight_bytes(model)
    base_speed = decode_benchmark(model, ids[:32], new_tokens=decode_tokens).decode_tokens_per_second
    early_ids = ids[: window * EARLY_WINDOWS + 1]
    early_base = perplexity(model, early_ids, window=window)
    trials: list[Trial] = []

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        method = trial.suggest_categorical("method", METHODS)
        group = trial.suggest_categorical("groupSize", GROUP_SIZES) if method == "int4-weight-only" else None
        fallback = trial.suggest_categorical("fallback", list(FALLBACKS))
        sparsity = trial.suggest_categorical("sparsity", SPARSITIES)
        config = compression_config(method, group, fallback, sparsity, skip_modules)
        candidate = copy.deepcopy(model)
        apply_config(candidate, config, calibration, smoothing_alpha, statistics)
        run_activations_in_fp32(candidate)  # measured as the CPU server runs it
        early_loss = quality_loss("perplexity", early_base, perplexity(candidate, early_ids, window=window))
        if early_loss > 2 * tolerable_loss:  # hopeless: do not spend the full evaluation on it
            record = Trial(
                number=trial.number,
                config=config,
                quality_loss=early_loss,
                size_reduction=base_bytes / weight_bytes(candidate),
                decode_speedup=0.0,
                feasible=False,
                cut_early=True,
            )
        else:
            loss = quality_loss("perplexity", base_quality, perplexity(candidate, ids, window=window))
            speed = decode_benchmark(candidate, ids[:32], new_tokens=decode_tokens).decode_tokens_per_second
            record = Trial(
                number=trial.number,
                config=config,
                quality_loss=loss,
                size_reduction=base_bytes / weight_bytes(candidate),
                decode_speedup=speed / base_speed,
                feasible=loss <= tolerable_loss,
            )
        trials.append(record)
        trial.set_constraint("qualityLoss", record.quality_loss - tolerable_loss)  # feasible when <= 0
        if progress:
            progress(record)
        return record.size_reduction, record.decode_speedup

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(8, max_trials))
    optuna.logging.set_verbosity(logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    for point in STARTING_POINTS[:max_trials]:
        study.enqueue_trial(point)
    study.optimize(objective, n_trials=max_trials)
    feasible = [t for t in trials if t.feasible]
    pareto = [t for t in feasible if not any(_dominates(o, t) for o in feasible)]
    chosen = max(pareto, key=lambda t: (round(t.size_reduction, 2), t.decode_speedup), default=None)
    return SearchResult(chosen=chosen, pareto=sorted(pareto, key=lambda t: -t.size_reduction), trials=trials)


def _dominates(a: Trial, b: Trial) -> bool:
    """``a`` is at least as good as ``b`` on both objectives and better on one."""
    at_least = a.size_reduction >= b.size_reduction and a.decode_speedup >= b.decode_speedup
    return at_least and (a.size_reduction > b.size_reduction or a.decode_speedup > b.decode_speedup)
