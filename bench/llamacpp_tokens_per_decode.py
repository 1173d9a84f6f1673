"""What one llama.cpp decode of k tokens of one sequence costs against one token: the price of
verifying drafted tokens (speculative or prompt-lookup decoding) on this CPU.

SmolLM2-135M-Instruct at each GGUF kind the pipeline publishes (made as ``bench/runtime.py`` makes
them), a 129-token context, ``--threads`` threads; each k is decoded ``--reps`` times in 3 rounds
(median of the round medians), and its cache cells removed after each. Printed: milliseconds and the
ratio to k = 1, measured in one run. Drafting pays only when the tokens accepted per decode exceed
that ratio.

    python bench/llamacpp_tokens_per_decode.py [--kinds Q8_0 Q4_0] [--threads 2] [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

from runtime import GGUF_KINDS, gguf_artifact, source_folder

from autoglm_core.paths import DEFAULT_CACHE_DIR
from autoglm_modeling.gguf_export import llama_cpp_available
from autoglm_modeling.llamacpp import LlamaCppModel

SIZES = (1, 2, 3, 4, 6, 8)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", nargs="+", default=["Q8_0", "Q4_0"], choices=GGUF_KINDS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not llama_cpp_available():
        raise SystemExit("llama-cpp-python is not installed (make install-llamacpp): nothing to measure")
    source, _ = source_folder(DEFAULT_CACHE_DIR)
    print(f"tokens per decode, one sequence, {args.threads} threads; ms (ratio to one token)")
    for kind in args.kinds:
        folder = gguf_artifact(DEFAULT_CACHE_DIR, source, kind)
        with LlamaCppModel(folder / "model.gguf", max_rows=1, context=1024, threads=args.threads) as model:
            seq = model._take_seq("measure")
            context = list(range(100, 229))
            model._run([(seq, p, t, p == len(context) - 1) for p, t in enumerate(context)])
            rounds: dict[int, list[float]] = {k: [] for k in SIZES}
            for _ in range(3):
                for k in SIZES:
                    times = []
                    for _ in range(args.reps):
                        start = time.perf_counter()
                        model._run([(seq, len(context) + j, 500 + j, True) for j in range(k)])
                        times.append(time.perf_counter() - start)
                        model._llama.llama_memory_seq_rm(model._memory, seq, len(context), -1)
                    rounds[k].append(statistics.median(times))
        one = statistics.median(rounds[1])
        cells = "  ".join(
            f"{k}: {statistics.median(v) * 1000:.1f} ({statistics.median(v) / one:.2f}x)"
            for k, v in rounds.items()
        )
        print(f"{kind:<6}{cells}")


if __name__ == "__main__":
    main()
