"""The pipeline steps: fetch, compress, calibrate, validate, publish.

Each step reads the folders of the steps it depends on under the workdir, writes its own folder
and ``STEP.json``, and raises StepFailedError with a one-line reason when it cannot do its job.
``run_step`` skips a step that already succeeded for the same inputs with its files intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from autoglm_api.resource import AutoGLMModel
from autoglm_core.card import write_model_card
from autoglm_core.digests import canonical_digest, sha256_file
from autoglm_core.errors import AutoGLMError
from autoglm_core.revision import artifact_revision, source_revision
from autoglm_core.uris import SourceError, TransientSourceError, resolve
from autoglm_core.variants import variant_named
from autoglm_modeling.folders import artifact_format, load_model_folder, save_model_folder
from autoglm_modeling.gguf_export import (
    ARCHITECTURES,
    GGUFExportError,
    gguf_kind,
    gguf_weight_bytes,
    llama_cpp_available,
    write_gguf_folder,
)
from autoglm_modeling.loading import load_causal_lm
from autoglm_modeling.quantization import (
    CAST_METHODS,
    EXECUTION_NOTE,
    QUANTIZATION_FILE,
    QuantizationPlan,
    run_activations_in_fp32,
    weight_bytes,
)
from autoglm_pipelines.calibration import Statistics, collect_statistics
from autoglm_pipelines.dag import PER_VARIANT, baseline_publisher, find_step, step_name
from autoglm_pipelines.evaluation import answer_nll_gguf, measure, measure_gguf, perplexity, perplexity_gguf
from autoglm_pipelines.finetune import answer_nll, encode
from autoglm_pipelines.formats import FormatChoice, choose_format
from autoglm_pipelines.gates import evaluate_gates, quality_loss
from autoglm_pipelines.results import VALIDATE_REPORT, StepResult, read_result, step_files, write_result
from autoglm_pipelines.resume import inputs_digest, reusable
from autoglm_pipelines.search import apply_config
from autoglm_pipelines.search import search as run_search
from autoglm_pipelines.text import read_text, tokenize, windows

MODEL_DIR = "model"
#: The weights of a variant published for llama.cpp (``write_gguf_folder`` lays them out).
GGUF_FILE = "model.gguf"
#: Beside compress's model folder: the engine the variant is published for, and why (``auto``).
ENGINE_FILE = "engine.json"
#: Beside the published artifact: the uncompressed source, published with ``--publish-baseline``.
BASELINE_DIR = "baseline"
CALIBRATION_FILE = "activations.safetensors"
#: GPTQ's input Hessians (written only when the spec asks for GPTQ).
HESSIAN_FILE = "hessians.safetensors"
#: The float model's per-channel activation maxima that SmoothQuant's migration was computed from.
SMOOTHING_FILE = "smoothquant-activations.safetensors"
SEARCH_REPORT = "search.json"
#: Tokens each search trial is scored on, at most: trials are many, validation is once.
SEARCH_MAX_TOKENS = 4096
#: Calibration windows for each SmoothQuant trial (its statistics depend on the trial's pruning).
SEARCH_CALIBRATION_WINDOWS = 4
#: SmoothQuant's migration strength; 0.7 measured best of 0.5/0.7/0.85 on SmolLM2 (ppl x1.021).
SMOOTHING_ALPHA = 0.7


class StepFailedError(Exception):
    """The step could not do its job; the message is the one-line reason.

    ``transient`` marks failures a retry may fix (a download that failed); the CLI exits 75 for
    them so that Argo's retry strategy retries them and nothing else.
    """

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient


@dataclass
class StepContext:
    workdir: Path
    cache_dir: Path
    #: New tokens per decode measurement in validate (128 in the benchmarks; tests use fewer).
    decode_tokens: int = 128
    #: Where publish writes the artifact; default ``WORKDIR/publish/model``.
    output: Path | None = None
    #: Whether publish also publishes the uncompressed source (``baseline/`` beside the artifact).
    baseline: bool = False
    #: The variant a per-variant step builds ("" for the spec's own): its folders are suffixed.
    variant: str = ""
    #: That variant's engine: torch, llama.cpp or auto (``autoglm_core.variants``).
    engine: str = "auto"
    #: That variant's revision (its engine is part of it): what publish writes in the card.
    revision: str = ""

    def folder(self, step: str) -> Path:
        """``step``'s folder: the shared steps', or this variant's (``compress`` -> ``compress-int4``)."""
        return self.workdir / step_name(step, self.variant)


@dataclass
class StepOutcome:
    metrics: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)


StepFunction = Callable[[AutoGLMModel, StepContext], StepOutcome]


def fetch(model: AutoGLMModel, ctx: StepContext) -> StepOutcome:
    source = model.spec.source
    path = resolve(source.uri, cache_dir=ctx.cache_dir, sha256=source.sha256, revision=source.revision)
    loaded = load_causal_lm(path, source.format, cache_dir=ctx.cache_dir)
    # A fresh folder, never files rewritten in place: a published baseline hard-links these files.
    shutil.rmtree(ctx.folder("fetch") / MODEL_DIR, ignore_errors=True)
    save_model_folder(loaded.model, loaded.tokenizer, ctx.folder("fetch") / MODEL_DIR)
    return StepOutcome(
        metrics={
            "architecture": type(loaded.model).__name__,
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
            "weightBytes": weight_bytes(loaded.model),
        },
        parameters={
            "uri": source.uri,
            "format": source.format,
            # a folder's identity: the SHA-256 of its files' hashes
            "sha256": sha256_file(path) if path.is_file() else canonical_digest(step_files(path)),
        },
    )


def source_folder(model: AutoGLMModel, ctx: StepContext) -> Path:
    """The model the later steps start from: finetune's when the spec fine-tunes, else fetch's."""
    return ctx.folder("finetune" if model.spec.training is not None else "fetch") / MODEL_DIR


#: Beside finetune's model: the held-out examples, for validate (one JSON object per line).
HELD_OUT_FILE = "heldout.jsonl"


def finetune_step(model: AutoGLMModel, ctx: StepContext) -> StepOutcome:
    """``spec.training``: LoRA on the dataset's training examples, merged (``autoglm_pipelines.finetune``);
    the held-out answers' NLL before and after, measured here on the float model."""
    from autoglm_pipelines.finetune import DatasetError, finetune, read_examples

    training = model.spec.training
    if training is None:
        raise StepFailedError("spec.training is not set: there is nothing to fine-tune on")
    path = resolve(training.dataset, cache_dir=ctx.cache_dir, sha256=training.sha256)
    if not path.is_file():
        raise StepFailedError(
            f"training dataset {training.dataset}: not a file (a JSON Lines file is expected)"
        )
    try:
        examples = read_examples(path, held_out=training.held_out, max_examples=training.max_examples)
    except DatasetError as exc:
        raise StepFailedError(f"training dataset {training.dataset}: {exc}") from exc
    lm, tokenizer, _ = load_model_folder(ctx.folder("fetch") / MODEL_DIR)
    held = [e for e in examples if e.held_out]
    before = answer_nll(lm, tokenizer, held)[0] if held else None
    # rehearsal on the calibration windows (they skip the tokens validation scores)
    rehearsal = calibration_batches(model, tokenizer, ctx) if training.rehearsal else None
    tuned, report = finetune(
        lm, tokenizer, examples, rank=training.rank, epochs=training.epochs, learning_rate=training.learning_rate,
        rehearsal=rehearsal,
    )  # fmt: skip
    after = answer_nll(tuned, tokenizer, held)[0] if held else None
    folder = ctx.folder("finetune")
    save_model_folder(tuned, tokenizer, folder / MODEL_DIR)
    (folder / HELD_OUT_FILE).write_text(
        "".join(
            json.dumps({"messages": [{"role": r, "content": c} for r, c in e.messages], "split": "heldout"})
            + "\n"
            for e in held
        )
    )
    return StepOutcome(
        metrics={
            **report.to_json(),
            "heldOutNllBefore": before,
            "heldOutNllAfter": after,
            "rehearsalWindows": 0 if rehearsal is None else int(rehearsal.shape[0]),
        },
        parameters={**training.to_json(), "datasetSha256": sha256_file(path)},
    )


def calibration_batches(model: AutoGLMModel, tokenizer: Any, ctx: StepContext) -> torch.Tensor:
    """``calibration.samples`` windows of ``sequenceLength`` tokens from the calibration dataset.

    When validation scores the same dataset, calibration starts after the tokens validation uses,
    so the quality gate is never measured on the text the model was calibrated on.
    """
    spec, validation = model.spec.calibration, model.spec.validation
    ids = tokenize(tokenizer, read_text(resolve(spec.dataset, cache_dir=ctx.cache_dir)))
    if spec.dataset == validation.dataset and ids.numel() > validation.max_tokens + spec.sequence_length:
        ids = ids[validation.max_tokens :]
    return windows(ids, length=spec.sequence_length, count=spec.samples)


def compress(model: AutoGLMModel, ctx: StepContext) -> StepOutcome:
    spec = model.spec.compression
    lm, tokenizer, _ = load_model_folder(source_folder(model, ctx))
    before = weight_bytes(lm)
    config = spec.to_json()
    if spec.search.enabled:
        chosen = json.loads((ctx.folder("search") / SEARCH_REPORT).read_text())["chosen"]["config"]
        # The search tunes method, group size, fallback and sparsity; the user's skipModules stay.
        skip = sorted(
            {*config["quantization"].get("skipModules", []), *chosen["quantization"]["skipModules"]}
        )
        config = {**config, **chosen, "quantization": {**chosen["quantization"], "skipModules": skip}}
    method = config["quantization"]["method"]
    choice = _format_choice(model, ctx, config)
    if choice.engine == "llama.cpp":
        try:
            return _compress_gguf(model, ctx, lm, tokenizer, config, choice, before)
        except GGUFExportError as exc:
            if ctx.engine == "llama.cpp":
                raise StepFailedError(f"engine llama.cpp: {exc}") from exc
            choice = FormatChoice("torch", reason=f"GGUF export failed: {exc}")
            shutil.rmtree(ctx.folder("compress"), ignore_errors=True)
            lm, tokenizer, _ = load_model_folder(source_folder(model, ctx))  # the GGUF path pruned it
    if ctx.engine == "llama.cpp":
        raise StepFailedError(f"engine llama.cpp: {choice.reason}")
    changes_layers = spec.distillation.enabled or config["pruning"]["method"] != "none"
    needs_data = spec.distillation.enabled or (method == "smoothquant-w8a8" and changes_layers)
    calibration = calibration_batches(model, tokenizer, ctx) if needs_data else None
    try:
        plan, report = apply_config(lm, config, calibration, SMOOTHING_ALPHA, calibration_statistics(ctx))
    except ValueError as exc:
        raise StepFailedError(f"compression with {method}: {exc}") from exc
    save_model_folder(lm, tokenizer, ctx.folder("compress") / MODEL_DIR, plan)
    _write_engine(ctx, choice)
    smoothing = report.pop("smoothingAbsmax", None)
    if smoothing:  # the statistics SmoothQuant's migration used, shipped with the weights they shaped
        tensors = {f"{name}.input_absmax": t.contiguous() for name, t in smoothing.items()}
        save_file(tensors, str(ctx.folder("compress") / MODEL_DIR / SMOOTHING_FILE))
    after = weight_bytes(lm)
    return StepOutcome(
        metrics={
            "weightBytes": after,
            "sizeReduction": before / after,
            "quantizedModules": len(plan.modules),
            "skippedModules": plan.skipped,
            "smoothedGroups": sum(v.startswith("smoothed") for v in plan.smoothing.values()),
            "pruning": report["pruning"],
            "distillation": report["distillation"],
            "engine": "torch",
            **({"engineReason": choice.reason} if choice.reason else {}),
        },
        parameters=config,
    )


def _format_choice(model: AutoGLMModel, ctx: StepContext, config: dict[str, Any]) -> FormatChoice:
    """GGUF for llama.cpp or safetensors for torch (``formats.choose_format``), for this variant."""
    if ctx.engine == "torch":
        return FormatChoice("torch")
    source = source_folder(model, ctx)
    architecture = (json.loads((source / "config.json").read_text()).get("architectures") or ["?"])[0]
    return choose_format(
        ctx.engine, config["quantization"], architecture=architecture, writable=tuple(ARCHITECTURES),
        llama_cpp=llama_cpp_available(),
    )  # fmt: skip


def _write_engine(ctx: StepContext, choice: FormatChoice) -> None:
    """The engine and (for an ``auto`` variant published for torch) why, as a file of the step's
    output: publish's reuse key hashes it, so a changed reason is never left in a reused card."""
    record = {"engine": choice.engine, **({"engineReason": choice.reason} if choice.reason else {})}
    (ctx.folder("compress") / ENGINE_FILE).write_text(_json(record))


def _compress_gguf(
    model: AutoGLMModel,
    ctx: StepContext,
    lm: Any,
    tokenizer: Any,
    config: dict[str, Any],
    choice: FormatChoice,
    before: int,
) -> StepOutcome:
    """Pruning and distillation in torch on the float model, then GGUF: exported at F32 and made
    ``choice.kind`` by llama.cpp's own quantizer (``llama_model_quantize``), with the tokenizer of
    the source GGUF where the source is one. Raises ``GGUFExportError`` for what GGUF cannot hold."""
    assert choice.kind is not None
    float_config = {**config, "quantization": {"method": "none"}}
    calibration = (
        calibration_batches(model, tokenizer, ctx) if model.spec.compression.distillation.enabled else None
    )
    try:
        _, report = apply_config(lm, float_config, calibration, SMOOTHING_ALPHA, calibration_statistics(ctx))
    except ValueError as exc:
        raise StepFailedError(f"compression for llama.cpp: {exc}") from exc
    out = ctx.folder("compress") / MODEL_DIR
    staged = ctx.folder("compress") / "float.partial"
    shutil.rmtree(staged, ignore_errors=True)
    save_model_folder(lm, tokenizer, staged)
    source = model.spec.source
    reference = None  # a GGUF source: its tokenizer fields are copied, so llama.cpp tokenizes as before
    if source.format == "gguf" or source.uri.endswith(".gguf"):
        reference = resolve(
            source.uri, cache_dir=ctx.cache_dir, sha256=source.sha256, revision=source.revision
        )
    try:
        write_gguf_folder(staged, out, choice.kind, base="F32", tokenizer_from=reference)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    after = gguf_weight_bytes(out / GGUF_FILE)
    _write_engine(ctx, choice)
    return StepOutcome(
        metrics={
            "weightBytes": after,
            "sizeReduction": before / after,
            "engine": "llama.cpp",
            "gguf": gguf_kind(out / GGUF_FILE),
            "pruning": report["pruning"],
            "distillation": report["distillation"],
        },
        parameters=config,
    )


def needs_hessians(model: AutoGLMModel) -> bool:
    """GPTQ reads the calibration inputs' Hessians; nothing else does (they are large: in^2 floats)."""
    return model.spec.compression.quantization.algorithm == "gptq"


def calibration_statistics(ctx: StepContext) -> Statistics:
    """What the calibrate step recorded on the source model."""
    folder = ctx.folder("calibrate")
    if not (folder / CALIBRATION_FILE).is_file():
        raise StepFailedError(f"{folder / CALIBRATION_FILE} is missing: run the calibrate step first")
    return Statistics.load(folder / CALIBRATION_FILE, folder / HESSIAN_FILE)


@torch.no_grad()
def calibrate(model: AutoGLMModel, ctx: StepContext) -> StepOutcome:
    """Record, once, on the source model, the activation statistics compression uses: per-channel
    input ranges (SmoothQuant, static ranges) and, for GPTQ, each layer's input Hessian."""
    spec = model.spec.calibration
    lm, tokenizer, _ = load_model_folder(source_folder(model, ctx))
    batches = calibration_batches(model, tokenizer, ctx)
    stats = collect_statistics(lm, batches, hessians=needs_hessians(model))
    absmax, mean_nll = stats.absmax, stats.mean_nll
    folder = ctx.folder("calibrate")
    folder.mkdir(parents=True, exist_ok=True)
    stats.save(folder / CALIBRATION_FILE, folder / HESSIAN_FILE if stats.hessians else None)
    peaks = {name: float(t.max()) for name, t in absmax.items()}
    outlier = max(peaks, key=peaks.__getitem__) if peaks else None
    return StepOutcome(
        metrics={
            "sequences": int(batches.shape[0]),
            "tokens": int(batches.numel()),
            "meanNll": mean_nll,
            "layers": len(absmax),
            "largestActivation": {"module": outlier, "absmax": peaks.get(outlier or "", 0.0)},
            "hessians": len({id(h) for h in stats.hessians.values()}),
        },
        parameters=spec.to_json(),
    )


def validate(model: AutoGLMModel, ctx: StepContext) -> StepOutcome:
    spec = model.spec.validation
    if spec.metric != "perplexity":
        raise StepFailedError(f"validation metric {spec.metric} is not implemented yet; use perplexity")
    baseline, tokenizer, _ = load_model_folder(ctx.folder("fetch") / MODEL_DIR)
    ids = tokenize(
        tokenizer, read_text(resolve(spec.dataset, cache_dir=ctx.cache_dir)), max_tokens=spec.max_tokens
    )
    gguf = ctx.folder("compress") / MODEL_DIR / GGUF_FILE
    engines = {"baseline": "torch", "candidate": "llama.cpp" if gguf.is_file() else "torch"}
    if gguf.is_file():  # measured on llama.cpp, before torch computes anything in this process
        cand = measure_gguf(gguf, ids, window=spec.sequence_length, new_tokens=ctx.decode_tokens)
    held = _held_out(model, ctx)
    rows = [encode(tokenizer, e) for e in held]
    # a fine-tuned candidate is judged against what serves now (the stable revision's artifact), on
    # the validation text and on the held-out feedback, each side on the engine that serves it
    against = _against(model, ctx)
    stable_quality: float | None = None
    held_nll: dict[str, float] = {}
    if held and gguf.is_file():
        held_nll["candidate"] = answer_nll_gguf(gguf, rows)
    if against is not None and (against / GGUF_FILE).is_file():
        engines["stable"] = "llama.cpp"
        stable_quality = perplexity_gguf(against / GGUF_FILE, ids, window=spec.sequence_length)
        if held:
            held_nll["stable"] = answer_nll_gguf(against / GGUF_FILE, rows)
    base = measure(baseline, ids, window=spec.sequence_length, new_tokens=ctx.decode_tokens)
    if held:
        held_nll["baseline"] = answer_nll(baseline, tokenizer, held)[0]
    del baseline
    if not gguf.is_file():
        candidate, _, _ = load_model_folder(ctx.folder("compress") / MODEL_DIR)
        run_activations_in_fp32(candidate)  # measured as a CPU server runs it (autoglm serve does the same)
        cand = measure(candidate, ids, window=spec.sequence_length, new_tokens=ctx.decode_tokens)
        if held:
            held_nll["candidate"] = answer_nll(candidate, tokenizer, held)[0]
        del candidate
    if against is not None and stable_quality is None:
        stable, _, _ = load_model_folder(against)
        run_activations_in_fp32(stable)
        engines["stable"] = "torch"
        stable_quality = perplexity(stable, ids, window=spec.sequence_length)
        if held:
            held_nll["stable"] = answer_nll(stable, tokenizer, held)[0]
        del stable
    # the fine-tune must beat what serves now (the stable revision's artifact), else the source
    versus = "stable" if "stable" in held_nll else "baseline"
    loss = quality_loss(spec.metric, base.quality, cand.quality)
    loss_vs_stable = (
        quality_loss(spec.metric, stable_quality, cand.quality) if stable_quality is not None else None
    )
    reduction = base.weight_bytes / cand.weight_bytes
    gates = evaluate_gates(
        spec.gates,
        quality_loss=loss,
        p95_token_latency_ms=cand.p95_token_latency_ms,
        size_reduction=reduction,
        held_out_nll_ratio=held_nll["candidate"] / held_nll[versus] if held else None,
        quality_loss_vs_stable=loss_vs_stable,
    )
    report = {
        "metric": spec.metric,
        "engines": engines,
        "tokens": int(ids.numel()),
        "baseline": base.to_json(),
        "candidate": cand.to_json(),
        "qualityLoss": loss,
        **({"stable": {"quality": stable_quality}, "qualityLossVsStable": loss_vs_stable} if against else {}),
        "sizeReduction": reduction,
        "decodeSpeedup": cand.decode_tokens_per_second / base.decode_tokens_per_second,
        **({"heldOut": {"examples": len(held), "answerNll": held_nll, "against": versus}} if held else {}),
        "gates": [g.to_json() for g in gates],
        "passed": all(g.passed for g in gates),
    }
    folder = ctx.folder("validate")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / VALIDATE_REPORT).write_text(_json(report))
    failed = [g for g in gates if not g.passed]
    if failed:
        raise StepFailedError("gate failed: " + "; ".join(g.describe() for g in failed))
    return StepOutcome(metrics=report, parameters=spec.to_json())


def _held_out(model: AutoGLMModel, ctx: StepContext) -> list[Any]:
    """The fine-tune's held-out examples (none without ``spec.training``, or when none were held out)."""
    if model.spec.training is None:
        return []
    from autoglm_pipelines.finetune import read_examples

    path = ctx.folder("finetune") / HELD_OUT_FILE
    if not path.is_file() or not path.read_text().strip():
        return []
    return read_examples(path, held_out=1.0, training=False)


def _against(model: AutoGLMModel, ctx: StepContext) -> Path | None:
    """The artifact ``training.against`` names (the stable revision's), as a local folder."""
    training = model.spec.training
    if training is None or training.against is None:
        return None
    path = resolve(training.against, cache_dir=ctx.cache_dir)
    return path.parent if path.is_file() else path


def publish(model: AutoGLMModel, ctx: StepContext) -> StepOutcome:
    report = read_result(ctx.folder("validate"))
    if report is None or report.status != "Succeeded":
        raise StepFailedError("validate has not passed: nothing to publish")
    target = ctx.folder("publish") / MODEL_DIR
    if ctx.output is not None:  # another variant's beside it: OUTPUT-int4
        target = ctx.output.with_name(f"{ctx.output.name}-{ctx.variant}") if ctx.variant else ctx.output
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(ctx.folder("compress") / MODEL_DIR, partial)
    gguf = (partial / GGUF_FILE).is_file()
    if not gguf:  # a GGUF folder holds its weights in one file: llama.cpp's statistics are its own
        shutil.copy2(ctx.folder("calibrate") / CALIBRATION_FILE, partial / CALIBRATION_FILE)
    searched = ("search",) if model.spec.compression.search.enabled else ()
    tuned = ("finetune",) if model.spec.training is not None else ()
    lineage = {
        kind: (r.to_json() if (r := read_result(ctx.folder(kind))) else None)
        for kind in ("fetch", *tuned, "calibrate", *searched, "compress", "validate")
    }
    fetched = lineage.get("fetch")
    card = {
        "model": model.namespaced_name,
        "revision": ctx.revision or artifact_revision(model.spec),
        **artifact_format(partial),
        "source": fetched["parameters"] if fetched else None,
        **({"training": model.spec.training.to_json()} if model.spec.training is not None else {}),
        "compression": model.spec.compression.to_json(),
        **_engine(lineage.get("compress")),
        "validation": report.metrics,
        "lineage": lineage,
    }
    plan_file = partial / QUANTIZATION_FILE
    if plan_file.is_file():
        plan = QuantizationPlan.from_json(json.loads(plan_file.read_text()))
        if plan.method not in CAST_METHODS:  # where it runs on kernels and where dequantized
            card["execution"] = EXECUTION_NOTE
    write_model_card(partial, card)
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    metrics: dict[str, Any] = {
        "artifact": str(target), "artifactFiles": step_files(target), "artifactBytes": _weight_bytes(target),
        "revision": card["revision"],
    }  # fmt: skip
    if ctx.baseline:  # only in the step baseline_publisher() names
        # beside the artifact, never in a folder another run's --output shares
        place = target.with_name(f"{target.name}-{BASELINE_DIR}" if ctx.output else BASELINE_DIR)
        baseline = _publish_baseline(model, ctx, place, report.metrics, fetched)
        metrics.update({
            "baseline": str(baseline), "baselineFiles": step_files(baseline),
            "baselineRevision": source_revision(model.spec), "baselineBytes": _weight_bytes(baseline),
        })  # fmt: skip
    return StepOutcome(metrics=metrics, parameters={"output": str(target)})


def _publish_baseline(
    model: AutoGLMModel, ctx: StepContext, target: Path, validation: dict[str, Any], fetched: Any
) -> Path:
    """The uncompressed source as fetched, as a servable artifact with its own model card (revision
    ``src-...``). Hard links where the filesystem allows (fetch writes a fresh folder each run, so
    they never change under it), else copies."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(ctx.folder("fetch") / MODEL_DIR, partial, copy_function=os.link)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(ctx.folder("fetch") / MODEL_DIR, partial)
    card = {
        "model": model.namespaced_name,
        "revision": source_revision(model.spec),
        "role": "baseline",
        **artifact_format(partial),
        "source": fetched["parameters"] if fetched else None,
        "validation": {k: v for k, v in validation.items() if k.startswith("baseline")},
        "lineage": {"fetch": fetched},
    }
    write_model_card(partial, card)
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    return target


def _engine(compressed: dict[str, Any] | None) -> dict[str, Any]:
    """What the card says of the engine that serves the artifact, and why an ``auto`` variant is not GGUF."""
    metrics = (compressed or {}).get("metrics") or {}
    found = {"engine": metrics.get("engine", "torch")}
    if metrics.get("engineReason"):
        found["engineReason"] = metrics["engineReason"]
    return found


def _weight_bytes(folder: Path) -> int:
    """Bytes of the weight files: what serving the folder holds in memory, about."""
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.gguf") for f in folder.glob(pattern))


def search(model: AutoGLMModel, ctx: StepContext) -> StepOutcome:
    spec, validation = model.spec.compression.search, model.spec.validation
    lm, tokenizer, _ = load_model_folder(source_folder(model, ctx))
    text = read_text(resolve(validation.dataset, cache_dir=ctx.cache_dir))
    ids = tokenize(tokenizer, text, max_tokens=min(validation.max_tokens, SEARCH_MAX_TOKENS))
    calibration = calibration_batches(model, tokenizer, ctx)[:SEARCH_CALIBRATION_WINDOWS]
    statistics = calibration_statistics(ctx)
    result = run_search(
        lm,
        ids,
        window=validation.sequence_length,
        tolerable_loss=spec.tolerable_loss,
        max_trials=spec.max_trials,
        calibration=calibration,
        statistics=statistics,
        skip_modules=tuple(model.spec.compression.quantization.skip_modules),
        smoothing_alpha=SMOOTHING_ALPHA,
        decode_tokens=min(ctx.decode_tokens, 32),
    )
    folder = ctx.folder("search")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SEARCH_REPORT).write_text(_json(result.to_json()))
    if result.chosen is None:
        raise StepFailedError(
            f"no configuration kept quality loss within {spec.tolerable_loss} in {spec.max_trials} trials; "
            "raise compression.search.tolerableLoss or maxTrials"
        )
    return StepOutcome(
        metrics={
            "chosen": result.chosen.to_json(),
            "pareto": len(result.pareto),
            "trials": len(result.trials),
        },
        parameters=spec.to_json(),
    )


STEPS: dict[str, StepFunction] = {
    "fetch": fetch,
    "finetune": finetune_step,
    "search": search,
    "compress": compress,
    "calibrate": calibrate,
    "validate": validate,
    "publish": publish,
}


def run_step(model: AutoGLMModel, step: str, ctx: StepContext) -> tuple[StepResult, bool]:
    """Run ``step`` (a name of ``pipeline_steps``: ``compress``, ``compress-int4``), or reuse its
    earlier result; return the result and whether it was reused. A variant's step sees the
    variant's spec (its compression) and its variant's folders.

    Raises StepFailedError after writing a Failed STEP.json; what the step wrote is kept.
    """
    try:
        found = find_step(model.spec, step)
    except ValueError as exc:
        raise StepFailedError(str(exc)) from exc
    baseline = ctx.baseline and step == baseline_publisher(model.spec)
    ctx = dataclasses.replace(ctx, variant=found.variant, baseline=baseline)
    built = model
    if found.kind in PER_VARIANT:
        variant = variant_named(model.spec, found.variant)
        ctx = dataclasses.replace(ctx, engine=variant.engine, revision=variant.revision)
        built = model.model_copy(update={"spec": variant.spec})
    earlier = reusable(
        model, step, ctx.workdir, decode_tokens=ctx.decode_tokens, output=ctx.output, baseline=ctx.baseline
    )
    if earlier is not None:
        return earlier, True
    digest = inputs_digest(
        model, step, ctx.workdir, decode_tokens=ctx.decode_tokens, output=ctx.output, baseline=ctx.baseline
    )
    folder = ctx.folder(step)
    # A step's folder holds what this run writes, nothing left by an earlier run with other inputs
    # (a stale Hessian file, a previous method's extra weights) that would be hashed as its output.
    shutil.rmtree(folder, ignore_errors=True)
    started = datetime.now(UTC)
    start = time.perf_counter()
    try:
        outcome = STEPS[found.function](built, ctx)
    except (
        StepFailedError,
        SourceError,
        AutoGLMError,  # e.g. llama.cpp refusing to load the GGUF validate measures
        OSError,
        ValueError,
        KeyError,
        RuntimeError,
        SafetensorError,
    ) as exc:
        # One line for whatever went wrong (a truncated checkpoint, a missing input folder, ...).
        known = isinstance(exc, StepFailedError | SourceError | AutoGLMError)
        reason = str(exc) if known else f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
        failure = StepResult(
            step=step,
            status="Failed",
            inputs_digest=digest,
            started_at=started.isoformat(),
            duration_seconds=time.perf_counter() - start,
            reason=reason,
        )
        write_result(folder, failure)
        raise StepFailedError(reason, transient=isinstance(exc, TransientSourceError)) from exc
    result = StepResult(
        step=step,
        status="Succeeded",
        inputs_digest=digest,
        started_at=started.isoformat(),
        duration_seconds=time.perf_counter() - start,
        files=step_files(folder),
        metrics=outcome.metrics,
        parameters=outcome.parameters,
    )
    write_result(folder, result)
    return result, False


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
