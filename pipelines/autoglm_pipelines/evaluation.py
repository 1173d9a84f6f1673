"""Measure a causal LM: perplexity, weight bytes, prefill and KV-cached greedy decode speed, energy.

Timings are wall-clock on this process's threads; they are reported, compared as ratios within
one run, and never asserted in tests.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from autoglm_core.camel import CamelModel
from autoglm_core.energy import EnergyMeter
from autoglm_modeling.gguf_export import gguf_weight_bytes
from autoglm_modeling.llamacpp import LlamaCppModel
from autoglm_modeling.loading import cache_kwargs
from autoglm_modeling.quantization import weight_bytes


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, *, window: int) -> float:
    """Perplexity over consecutive non-overlapping windows of ``ids`` (1-D), every token predicted once."""
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window + 1]
        if chunk.numel() < 2:
            break
        inputs, targets = chunk[:-1].unsqueeze(0), chunk[1:].unsqueeze(0)
        logits = model(input_ids=inputs).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.shape[-1]), targets.view(-1), reduction="sum"
        )
        nll += float(loss)
        count += targets.numel()
    return math.exp(nll / count)


class DecodeStats(CamelModel, frozen=True):
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    p50_token_latency_ms: float
    p95_token_latency_ms: float
    joules_per_token: float
    energy_method: str
    new_tokens: int


@torch.no_grad()
def decode_benchmark(
    model: nn.Module,
    prompt: torch.Tensor,
    *,
    new_tokens: int = 128,
    warmup: int = 1,
    meter: EnergyMeter | None = None,
) -> DecodeStats:
    """Greedy decoding at batch 1 with a KV cache: prefill once, then one token per step, each timed."""
    meter = meter or EnergyMeter()
    ids = prompt.view(1, -1)
    for _ in range(warmup):
        _greedy(model, ids, min(new_tokens, 8))
    with meter.measure() as energy:
        prefill_s, steps = _greedy(model, ids, new_tokens)
    assert energy.reading is not None
    return _decode_stats(int(ids.shape[1]), prefill_s, steps, energy.reading.joules, energy.reading.method)


def _decode_stats(
    prompt_tokens: int, prefill_s: float, steps: list[float], joules: float, method: str
) -> DecodeStats:
    ms = sorted(s * 1000 for s in steps)
    return DecodeStats(
        prefill_tokens_per_second=prompt_tokens / prefill_s,
        decode_tokens_per_second=len(steps) / sum(steps),
        p50_token_latency_ms=statistics.median(ms),
        p95_token_latency_ms=ms[min(len(ms) - 1, math.ceil(0.95 * len(ms)) - 1)],
        joules_per_token=joules / (len(steps) + 1),
        energy_method=method,
        new_tokens=len(steps) + 1,
    )


def _greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
    cache = DynamicCache()
    start = time.perf_counter()
    out = model(input_ids=ids, **cache_kwargs(model, cache))
    token = out.logits[:, -1:].argmax(-1)
    prefill = time.perf_counter() - start
    steps = []
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        out = model(input_ids=token, **cache_kwargs(model, cache))
        token = out.logits[:, -1:].argmax(-1)
        steps.append(time.perf_counter() - start)
    return prefill, steps


class ModelMeasurement(DecodeStats, frozen=True):
    """Quality, weight bytes and decode figures of one model, as the validate report lists them."""

    quality: float
    weight_bytes: int


def measure(
    model: nn.Module, ids: torch.Tensor, *, window: int, prompt_tokens: int = 64, new_tokens: int = 128
) -> ModelMeasurement:
    """Perplexity on ``ids`` plus decode speed from a prompt taken from its start."""
    decode = decode_benchmark(model, ids[:prompt_tokens], new_tokens=new_tokens)
    return ModelMeasurement(
        quality=perplexity(model, ids, window=window), weight_bytes=weight_bytes(model), **dict(decode)
    )


def measure_gguf(
    path: Path,
    ids: torch.Tensor,
    *,
    window: int,
    prompt_tokens: int = 64,
    new_tokens: int = 128,
    warmup: int = 1,
) -> ModelMeasurement:
    """``measure`` on llama.cpp, the engine that serves a GGUF variant: perplexity over the same
    non-overlapping windows (``LlamaCppModel.negative_log_likelihood``), and greedy decode at batch 1
    from the same prompt, each step timed, on torch's thread count; weight bytes are the GGUF's tensors'.
    Raises ``ArtifactError`` when llama.cpp cannot load the file."""
    tokens = [int(t) for t in ids.view(-1).tolist()]
    prompt = tokens[:prompt_tokens]
    meter = EnergyMeter()
    # the threads torch measures the baseline with, so the two sides' latencies compare
    threads = torch.get_num_threads()
    with LlamaCppModel(
        path, max_rows=1, context=max(window, len(prompt) + new_tokens), threads=threads
    ) as model:
        for _ in range(warmup):
            model.greedy(prompt, min(new_tokens, 8))
        with meter.measure() as energy:
            _, prefill_s, steps = model.greedy(prompt, new_tokens)
        assert energy.reading is not None
        quality = _perplexity_llamacpp(model, tokens, window)
    decode = _decode_stats(len(prompt), prefill_s, steps, energy.reading.joules, energy.reading.method)
    return ModelMeasurement(quality=quality, weight_bytes=gguf_weight_bytes(path), **dict(decode))


def perplexity_gguf(path: Path, ids: torch.Tensor, *, window: int) -> float:
    """``perplexity`` on llama.cpp over the same non-overlapping windows."""
    with LlamaCppModel(path, max_rows=1, context=window + 1, threads=torch.get_num_threads()) as model:
        return _perplexity_llamacpp(model, [int(t) for t in ids.view(-1).tolist()], window)


def _perplexity_llamacpp(model: LlamaCppModel, tokens: list[int], window: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start : start + window + 1]
        if len(chunk) < 2:
            break
        scored, n = model.negative_log_likelihood(chunk)
        nll, count = nll + scored, count + n
    return math.exp(nll / count)


def answer_nll_gguf(path: Path, rows: Sequence[tuple[list[int], int]]) -> float:
    """``finetune.answer_nll`` on llama.cpp: the mean NLL per answer token of rows ``(ids, answer
    start)``, each as the full sequence's NLL less its prompt's (the model is causal: the prompt's
    tokens score the same with or without the answer after them)."""
    context = max(len(ids) for ids, _ in rows)
    total, count = 0.0, 0
    with LlamaCppModel(path, max_rows=1, context=context, threads=torch.get_num_threads()) as model:
        for ids, start in rows:
            whole, n = model.negative_log_likelihood(ids)
            prompt = model.negative_log_likelihood(ids[:start])[0] if start >= 2 else 0.0
            total, count = total + whole - prompt, count + n - max(start - 1, 0)
    return total / count if count else math.nan
