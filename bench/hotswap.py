"""Hot-swap under load, then overload, on one ``autoglm serve`` of SmolLM2-135M int8-weight-only.

1. Steady: 8 closed-loop clients (OpenAI completions, 16 new tokens) for ``--steady`` seconds.
2. Swaps: the same load for ``--seconds`` while the revision is swapped ``--swaps`` times through
   ``POST /v2/repository/models/NAME/load`` (alternating two published artifacts; one of the swaps
   offers a corrupt artifact, which must be refused while serving goes on). Prints failed requests,
   p99 latency during swaps against steady, and the swap time (load call to alias flip).
3. Overload: an open-loop arrival rate of 4x the steady throughput for ``--overload`` seconds.
   Prints the share of 429s, whether the server survived, and its peak RSS against its RSS before.

    python bench/hotswap.py [--seconds 60] [--swaps 10] [--steady 20] [--overload 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
from serving_common import Load, closed_loop, int8_artifact, one_request, percentile, prompts

from autoglm_core.paths import DEFAULT_CACHE_DIR
from autoglm_inference.process import ServerProcess

CLIENTS = 8
MAX_TOKENS = 16


def corrupt_copy(folder: Path, into: Path) -> Path:
    shutil.copytree(folder, into)
    weights = next(p for p in into.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    weights.write_bytes(bytes(data))
    return into


def swap_loop(url: str, uris: list[tuple[str, str | None]], interval: float, results: list[dict]) -> None:
    for uri, sha in uris:
        time.sleep(interval)
        body = {"parameters": {"uri": uri, **({"sha256": sha} if sha else {})}}
        start = time.perf_counter()
        r = httpx.post(f"{url}/v2/repository/models/smollm2/load", json=body, timeout=600)
        results.append(
            {
                "uri": uri,
                "status": r.status_code,
                "seconds": time.perf_counter() - start,
                "window": (start, time.perf_counter()),
            }
        )


async def open_loop(url: str, texts: list[str], rate: float, seconds: float) -> Load:
    load = Load()
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=512)) as client:
        tasks = []
        n = 0
        while time.perf_counter() - start < seconds:
            tasks.append(
                asyncio.create_task(
                    one_request(client, url, "smollm2", texts[n % len(texts)], MAX_TOKENS, load)
                )
            )
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
    load.seconds = time.perf_counter() - start
    return load


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--steady", type=float, default=20)
    parser.add_argument("--overload", type=float, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args()

    a, sha_a = int8_artifact(args.cache_dir, "bench-a")
    b, sha_b = int8_artifact(args.cache_dir, "bench-b")
    texts = prompts(args.cache_dir, 256)
    with tempfile.TemporaryDirectory() as tmp:
        bad = corrupt_copy(b, Path(tmp) / "corrupt")
        plan: list[tuple[str, str | None]] = []
        for i in range(args.swaps):
            if i == args.swaps // 2:
                plan.append((str(bad), None))
            else:
                plan.append((str(b), sha_b) if i % 2 == 0 else (str(a), sha_a))
        server = ServerProcess(
            "smollm2", str(a), "--max-batch-size", "16", "--max-queue", "32", log=Path(tmp) / "server.log",
            threads=args.threads, model_roots=[a.parent, tmp],  # the corrupt copy lives in tmp
        ).wait_ready()  # fmt: skip
        process = psutil.Process(server.process.pid)
        try:
            asyncio.run(
                closed_loop(server.url, "smollm2", texts, clients=2, max_tokens=4, requests_per_client=1)
            )
            steady = asyncio.run(
                closed_loop(
                    server.url, "smollm2", texts, clients=CLIENTS, max_tokens=MAX_TOKENS, seconds=args.steady
                )
            )
            swaps: list[dict] = []
            swapper = threading.Thread(
                target=swap_loop, args=(server.url, plan, args.seconds / (args.swaps + 1), swaps), daemon=True
            )
            swapper.start()
            during = asyncio.run(
                closed_loop(
                    server.url, "smollm2", texts, clients=CLIENTS, max_tokens=MAX_TOKENS, seconds=args.seconds
                )
            )
            swapper.join()

            rate = 4 * steady.ok / steady.seconds
            rss_before = process.memory_info().rss
            peak = [rss_before]
            stop = threading.Event()

            def watch() -> None:
                while not stop.is_set():
                    try:
                        peak[0] = max(peak[0], process.memory_info().rss)
                    except psutil.Error:
                        return
                    time.sleep(0.1)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            overload = asyncio.run(open_loop(server.url, texts, rate, args.overload))
            stop.set()
            watcher.join()
            alive = server.alive and httpx.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200
        finally:
            server.stop()

    print(
        f"SmolLM2-135M int8-weight-only, {CLIENTS} closed-loop clients, {MAX_TOKENS} new tokens per request, {args.threads} threads"
    )
    print(f"steady  {args.steady:.0f}s: {steady.ok} requests, p50 {percentile(steady.latencies, 0.5):.2f}s, "
          f"p99 {percentile(steady.latencies, 0.99):.2f}s, {steady.ok / steady.seconds:.1f} req/s")  # fmt: skip
    print(f"swaps   {args.seconds:.0f}s: {during.ok} requests, {during.failed} failed (target 0), "
          f"p99 {percentile(during.latencies, 0.99):.2f}s")  # fmt: skip
    for s in swaps:
        outcome = "alias flip" if s["status"] == 200 else "refusal"
        print(
            f"  load {Path(s['uri']).name:24} -> {s['status']}  {s['seconds']:.2f}s from load call to {outcome}"
        )
    ok = [s["seconds"] for s in swaps if s["status"] == 200]
    refused = [s for s in swaps if s["status"] != 200]
    ratio = percentile(during.latencies, 0.99) / percentile(steady.latencies, 0.99)
    print(f"p99 during swaps vs steady: x{ratio:.2f} (target <= 2: {'met' if ratio <= 2 else 'NOT met'}); "
          f"{len(ok)} swaps, median {percentile(ok, 0.5):.2f}s, max {max(ok, default=float('nan')):.2f}s; "
          f"{len(refused)} refused (the corrupt artifact)")  # fmt: skip
    total = sum(overload.statuses.values()) + len(overload.errors)
    print(f"overload {args.overload:.0f}s at {rate:.1f} req/s (4x steady): {total} requests, "
          f"{overload.statuses.get(429, 0) / max(total, 1):.0%} answered 429, {overload.ok} served, "
          f"other failures {overload.failed - overload.statuses.get(429, 0)}, server {'up' if alive else 'DOWN'}, "
          f"peak RSS {peak[0] / 2**20:.0f} MiB vs {rss_before / 2**20:.0f} MiB before (x{peak[0] / rss_before:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
