"""Dynamic batching against the same server with batching off, on SmolLM2-135M int8-weight-only.

Two runs of ``autoglm serve`` on loopback, one after the other, serving the same artifact (int8
weight-only, as the pipeline publishes it): batching on (continuous, up to 16 rows) and off
(``--max-batch-size 1``). The same closed-loop load hits each: 16 concurrent clients, each sending
its next OpenAI completion (64 new tokens, greedy) when the last one is answered. Prints aggregate
generated tokens/s and the p50/p95 request latency of each, and their ratios.

    python bench/serving.py [--clients 16] [--requests 2] [--max-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from serving_common import closed_loop, int8_artifact, percentile, prompts

from autoglm_core.paths import DEFAULT_CACHE_DIR
from autoglm_inference.process import ServerProcess

TARGET_SPEEDUP = 3.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args()

    artifact, _ = int8_artifact(args.cache_dir, "bench-a")
    texts = prompts(args.cache_dir, args.clients * args.requests)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, flags in [
            ("batching off", ["--max-batch-size", "1"]),
            ("dynamic + continuous batching", ["--max-batch-size", "16", "--max-batch-delay-ms", "20"]),
        ]:
            server = ServerProcess(
                "smollm2", str(artifact), *flags, "--max-queue", "256", log=Path(tmp) / "server.log",
                threads=args.threads,
            ).wait_ready()  # fmt: skip
            try:
                # Warm up (first-call allocations), then measure.
                asyncio.run(
                    closed_loop(server.url, "smollm2", texts, clients=2, max_tokens=8, requests_per_client=1)
                )
                load = asyncio.run(
                    closed_loop(
                        server.url, "smollm2", texts, clients=args.clients, max_tokens=args.max_tokens,
                        requests_per_client=args.requests,
                    )
                )  # fmt: skip
            finally:
                server.stop()
            if load.failed:
                raise SystemExit(f"{label}: {load.failed} requests failed: {load.statuses} {load.errors[:3]}")
            rows.append((label, load))

    print(f"SmolLM2-135M int8-weight-only, {args.clients} concurrent clients x {args.requests} requests, "
          f"{args.max_tokens} new tokens each (greedy), {args.threads} torch threads, same artifact, one run")  # fmt: skip
    print(f"{'server':32} {'requests':>8} {'tokens':>7} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7}")
    for label, load in rows:
        print(
            f"{label:32} {load.ok:8} {load.tokens:7} {load.tokens / load.seconds:8.1f} "
            f"{percentile(load.latencies, 0.5):7.2f} {percentile(load.latencies, 0.95):7.2f}"
        )
    (_, off), (_, on) = rows
    speedup = (on.tokens / on.seconds) / (off.tokens / off.seconds)
    p95 = percentile(on.latencies, 0.95) / percentile(off.latencies, 0.95)
    verdict = "met" if speedup >= TARGET_SPEEDUP else "NOT met"
    print(f"aggregate tokens/s, batching on vs off: x{speedup:.2f} (target >= {TARGET_SPEEDUP}: {verdict}); "
          f"p95 latency on vs off: x{p95:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
