"""CPU runtimes side by side, in one run: our engines behind ``autoglm serve`` against llama.cpp itself.

SmolLM2-135M-Instruct, greedy, the same threads everywhere (``--threads``, default 2). For every
variant the pipeline publishes for a CPU target:

- **ours, llama.cpp engine**: each GGUF kind the pipeline publishes for a CPU target (``formats.
  GGUF_KINDS``: F32, F16, BF16, Q8_0, Q4_0), made as the compress step makes it (an F32 export, then
  llama.cpp's own quantizer), served by ``autoglm serve --engine llama.cpp``;
- **ours, torch engine**: fp32, int8 and int4 (g32) weight-only, what a CPU target gets where
  llama.cpp is not installed, served by ``autoglm serve --engine torch``;
- **anchor**: llama.cpp through llama-cpp-python's own ``Llama`` (its generate loop, one sequence),
  with flash attention on as llama.cpp's own tools default to on a CPU (and as our engine runs).

Measured for each: batch-1 decode tokens/s streamed through the OpenAI route as a client sees it
(median of ``--reps`` rounds; tokens after the first over the time after the first), the same engine
called without HTTP, prefill tokens/s (a ~600-token prompt: prompt tokens / time to first token),
and 16-client throughput (closed loop, 64 new tokens each). The anchor, the engine called directly
and the server of one kind are loaded at once, each in its own process, and take turns in rounds;
the decode ratio to the anchor at the same bits is the median of the rounds' ratios. llama.cpp's
``Llama`` decodes one sequence at a time, so its 16-client figure is its batch-1 rate.

    python bench/runtime.py [--threads 2] [--tokens 128] [--clients 16] [--reps 5] [--only gguf|torch]

Without llama-cpp-python (``make install-llamacpp``) only the torch rows are measured, and it says so.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from serving_common import MODEL, TEXT, closed_loop, int8_artifact, prompts

from autoglm_core.card import MODEL_CARD, write_model_card
from autoglm_core.paths import DEFAULT_CACHE_DIR
from autoglm_core.uris import resolve
from autoglm_inference.process import ServerProcess
from autoglm_modeling.folders import save_model_folder
from autoglm_modeling.gguf_export import (
    export_gguf,
    gguf_kind,
    llama_cpp_available,
    require_llama_cpp,
    write_gguf_folder,
)
from autoglm_modeling.loading import load_causal_lm
from autoglm_modeling.quantization import quantize_model
from autoglm_pipelines.formats import GGUF_KINDS as PUBLISHED_KINDS
from autoglm_pipelines.text import read_text

#: Same bits: which anchor each variant is compared with. Every kind the pipeline publishes.
GGUF_KINDS = tuple(dict.fromkeys(PUBLISHED_KINDS.values()))
TORCH_VARIANTS = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}
SIMD = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_int8",
    "neon",
    "asimd",
)


@dataclass
class Row:
    name: str
    engine: str
    bits: str  # the anchor kind it is compared with
    size_mb: float
    decode: list[float] = field(default_factory=list)  # streamed through the server
    paired: list[float] = field(default_factory=list)  # each round's server rate / the anchor's
    direct: list[float] = field(default_factory=list)  # the same engine in-process
    prefill: list[float] = field(default_factory=list)
    clients: float = float("nan")
    tokens: list[int] = field(default_factory=list)  # the first greedy tokens, for the same-output check


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per batch-1 decode run")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5, help="rounds (each runtime once per round)")
    parser.add_argument("--only", choices=["gguf", "torch"], default=None)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    print(
        f"CPU: {cpu_name()}; SIMD: {' '.join(f for f in SIMD if f in cpu_flags()) or '?'}; threads {args.threads}"
    )
    have_llama = llama_cpp_available()
    if have_llama:  # what llama.cpp was compiled for (an AVX2 build on an AVX-512 CPU says so here)
        info = require_llama_cpp("the anchor").llama_print_system_info().decode().replace("CPU : ", "")
        print(f"llama.cpp built with: {' '.join(f for f in info.split(' | ') if f.endswith('= 1'))}")
    if not have_llama:
        print(
            "llama-cpp-python is not installed (make install-llamacpp): the GGUF rows and the anchor are skipped"
        )
    source, tokenizer = source_folder(args.cache_dir)
    text = read_text(resolve(TEXT, cache_dir=args.cache_dir))
    decode_prompt = "Continue this scene from Hamlet:\n" + text[20_000:20_400]
    prefill_prompt = text[40_000:42_000]
    ids = [int(i) for i in tokenizer(decode_prompt)["input_ids"]]
    long_ids = [int(i) for i in tokenizer(prefill_prompt)["input_ids"]]
    texts = (decode_prompt, prefill_prompt)
    print(f"decode prompt {len(ids)} tokens, {args.tokens} new; prefill prompt {len(long_ids)} tokens")

    rows: list[Row] = []
    anchors: dict[str, Row] = {}
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        if have_llama and args.only != "torch":
            for kind in GGUF_KINDS:
                folder = gguf_artifact(args.cache_dir, source, kind)
                row, anchor = measure_kind(
                    folder, folder / "model.gguf", "llama.cpp", kind, kind, ids, long_ids, args, logs, texts
                )
                assert anchor is not None
                rows.append(row)
                anchors[kind] = anchor
        if args.only != "gguf":
            for variant, bits in TORCH_VARIANTS.items():
                folder = torch_artifact(args.cache_dir, source, variant)
                rows.append(
                    measure_kind(folder, None, "torch", variant, bits, ids, long_ids, args, logs, texts)[0]
                )
    report(rows, anchors, args)


# -- artifacts ------------------------------------------------------------------------------------


def source_folder(cache_dir: Path) -> tuple[Path, object]:
    lm = load_causal_lm(resolve(MODEL, cache_dir=cache_dir), "gguf", cache_dir=cache_dir)
    return lm.folder, lm.tokenizer


def gguf_artifact(cache_dir: Path, source: Path, kind: str) -> Path:
    """``source`` as the pipeline publishes a llama.cpp variant: ``model.gguf`` beside its tokenizer,
    quantized by llama.cpp from an F32 export as the compress step does."""
    folder = cache_dir / "bench" / "runtime" / f"gguf-f32base-{kind}"
    if (folder / MODEL_CARD).is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    reference = resolve(MODEL, cache_dir=cache_dir)  # the shipped GGUF: its tokenizer fields are copied
    f32 = cache_dir / "bench" / "runtime" / "smollm2-F32.gguf"
    if not f32.is_file():
        export_gguf(source, f32, dtype="F32", tokenizer_from=reference)
    write_gguf_folder(source, folder, kind, tokenizer_from=reference, exported=f32, base="F32")  # type: ignore[arg-type]
    card = {
        "model": "bench/smollm2",
        "revision": f"gguf-{kind.lower()}",
        "format": f"gguf {gguf_kind(folder / 'model.gguf')}",
    }
    write_model_card(folder, card)
    return folder


def torch_artifact(cache_dir: Path, source: Path, variant: str) -> Path:
    if variant == "fp32":
        return source
    if variant == "int8":
        return int8_artifact(cache_dir, "runtime-int8")[0]
    folder = cache_dir / "bench" / "runtime" / "torch-int4"
    if not (folder / MODEL_CARD).is_file():
        lm = load_causal_lm(source, None, cache_dir=cache_dir)
        plan = quantize_model(lm.model, "int4-weight-only", group_size=32)
        save_model_folder(lm.model, lm.tokenizer, folder, plan)
        write_model_card(folder, {"model": "bench/smollm2", "revision": "torch-int4"})
    return folder


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*") if p.suffix in (".gguf", ".safetensors")) / 1e6


# -- measurements ---------------------------------------------------------------------------------
#
# Every runtime of one kind is loaded at once, each in its own process (the anchor, our engine called
# directly, our server), and their repetitions alternate in rounds (the order turns every round), so a
# slow minute on a shared machine falls on all of them alike; the decode ratio is the median of each
# round's ratio. One block per runtime had the anchor alone move by 25% between runs here.


class Worker:
    """A child process that loads one runtime and answers ``decode``/``prefill`` commands on stdin."""

    def __init__(self, role: str, request: dict[str, object]) -> None:
        self.role = role
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", role, json.dumps(request)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        self.ask("ready")

    def ask(self, command: str) -> dict[str, object]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            self.process.wait()
            raise SystemExit(f"the {self.role} worker ended (rc {self.process.returncode}) on {command!r}")
        return dict(json.loads(answer))

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def measure_kind(
    folder: Path, anchor_path: Path | None, engine: str, name: str, bits: str,
    ids: list[int], long_ids: list[int], args: argparse.Namespace, logs: Path, texts: tuple[str, str],
) -> tuple[Row, Row | None]:  # fmt: skip
    """Our server and engine on ``folder`` and, given ``anchor_path``, llama.cpp itself on it, their
    repetitions interleaved; returns (ours, anchor)."""
    common = {"ids": ids, "long_ids": long_ids, "threads": args.threads, "tokens": args.tokens,
              "cache_dir": str(args.cache_dir)}  # fmt: skip
    row = Row(f"ours {name}", engine, bits, size_mb(folder))
    anchor = (
        Row(f"llama.cpp {bits}", "anchor", bits, anchor_path.stat().st_size / 1e6) if anchor_path else None
    )
    workers: dict[str, Worker] = {}
    server: ServerProcess | None = None
    try:
        if anchor_path is not None:
            workers["anchor"] = Worker("anchor", {**common, "path": str(anchor_path)})
        workers["direct"] = Worker("direct", {**common, "folder": str(folder), "engine": engine})
        server = ServerProcess(
            "smol", str(folder), "--engine", engine, "--max-batch-size", str(args.clients),
            "--max-prompt-tokens", "4096", log=logs / f"{engine}-{name}.log", threads=args.threads,
        ).wait_ready(300)  # fmt: skip
        url = server.url
        runs = {
            "anchor": lambda: workers["anchor"].ask("decode"),
            "direct": lambda: workers["direct"].ask("decode"),
            "server": lambda: stream(url, texts[0], args.tokens),
        }
        order = [r for r in ("anchor", "server", "direct") if r != "anchor" or anchor is not None]
        stream(url, texts[0], 8)  # warm-up; the workers warmed up when they loaded
        for round_ in range(args.reps):
            turned = order[round_ % len(order) :] + order[: round_ % len(order)]
            rates: dict[str, float] = {}
            for runtime in turned:
                answer = runs[runtime]()
                rates[runtime] = float(answer["rate"])  # type: ignore[arg-type]
                if runtime == "direct":  # the server's route gives text, not token ids
                    row.tokens = list(answer["tokens"])  # type: ignore[call-overload]
                elif runtime == "anchor" and anchor is not None:
                    anchor.tokens = list(answer["tokens"])  # type: ignore[call-overload]
            row.decode.append(rates["server"])
            row.direct.append(rates["direct"])
            if anchor is not None:
                anchor.decode.append(rates["anchor"])
                row.paired.append(rates["server"] / rates["anchor"])
                anchor.prefill.append(float(workers["anchor"].ask("prefill")["rate"]))  # type: ignore[arg-type]
            ttft = float(stream(url, texts[1], 1)["ttft"])
            row.prefill.append(len(long_ids) / ttft)
        for worker in workers.values():  # nothing else runs while the server is loaded by 16 clients
            worker.close()
        load = asyncio.run(
            closed_loop(url, "smol", prompts(args.cache_dir, 64), clients=args.clients, max_tokens=64,
                        requests_per_client=2)
        )  # fmt: skip
        if load.failed:
            raise SystemExit(
                f"{row.name}: {load.failed} of {load.ok + load.failed} requests failed: {load.errors[:2]}"
            )
        row.clients = load.tokens / load.seconds
    finally:
        for worker in workers.values():
            worker.close()
        if server is not None:
            server.stop()
    if anchor is not None:
        anchor.direct = anchor.decode
        anchor.clients = statistics.median(anchor.decode)  # one sequence at a time
    return row, anchor


def stream(url: str, prompt: str, n: int) -> dict[str, object]:
    """One streamed completion of ``prompt`` as a client sees it: time to first token, decode tokens/s
    after the first, and how many tokens it generated.

    The client only reads while the answer streams (each read timed as it returns) and parses the
    events afterwards: it shares the server's cores, and parsing every event as it came (httpx's
    ``iter_lines`` and ``json.loads``) cost 0.45 ms of CPU per token here, 7% of a Q4_0 decode step,
    which llama.cpp's own loop, the anchor, never pays."""
    parts = urllib.parse.urlsplit(url)
    body = json.dumps({"model": "smol", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})  # fmt: skip
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=600)
    reads: list[tuple[float, bytes]] = []
    try:
        start = time.perf_counter()
        connection.request("POST", "/openai/v1/completions", body, {"content-type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise SystemExit(f"{url}: HTTP {response.status}: {response.read()[:500]!r}")
        while data := response.read1(65536):
            reads.append((time.perf_counter(), data))
    finally:
        connection.close()
    first = last = 0.0
    completion = 0
    pending = b""
    for at, data in reads:
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                completion = int(event["usage"]["completion_tokens"])
            elif event["choices"] and event["choices"][0].get("text"):
                last = at
                first = first or at
    rate = (completion - 1) / (last - first) if completion > 1 and last > first else float("nan")
    return {"ttft": first - start, "rate": rate, "completion": completion}


def worker(role: str, request: dict[str, object]) -> None:
    """``--worker anchor|direct``: load the runtime, warm it up, then answer one JSON line per command
    (``decode``: one batch-1 greedy decode of ``tokens`` new tokens; ``prefill``, the anchor only:
    the long prompt; the server's prefill is timed through its route)."""
    args = argparse.Namespace(**request)
    ids, long_ids = list(args.ids), list(args.long_ids)
    prefill: Callable[[list[int]], float] | None = None
    if role == "anchor":
        decode, prefill = anchor_runtime(Path(args.path), args.threads)
    else:
        decode = direct_runtime(Path(args.folder), args.engine, args.threads, Path(args.cache_dir))
    decode(ids, min(args.tokens, 16))
    for command in sys.stdin:
        command = command.strip()
        if command == "ready":
            answer: dict[str, object] = {}
        elif command == "decode":
            answer = decode(ids, args.tokens)
        elif command == "prefill" and prefill is not None:
            answer = {"rate": len(long_ids) / prefill(long_ids)}
        else:
            raise SystemExit(f"unknown command {command!r}")
        print(json.dumps(answer), flush=True)


Decode = Callable[[list[int], int], dict[str, object]]


def anchor_runtime(path: Path, threads: int) -> tuple[Decode, Callable[[list[int]], float]]:
    """llama.cpp through llama-cpp-python's own ``Llama`` and its generate loop."""
    llm = require_llama_cpp("the llama.cpp anchor").Llama(
        str(path), n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads,
        # llama.cpp's own default (its tools' `-fa auto`: on for the CPU), which our engine's context
        # keeps; llama-cpp-python's `Llama` turns it off unless asked, 9% (Q8_0) to 25% (Q4_0) slower
        # here, and with other greedy tokens at Q4_0
        flash_attn=True, verbose=False,
    )  # fmt: skip

    def decode(ids: list[int], n: int) -> dict[str, object]:
        tokens: list[int] = []
        first = 0.0
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if not tokens:
                first = time.perf_counter()
            tokens.append(int(token))
            if len(tokens) >= n:
                break
        rate = (len(tokens) - 1) / (time.perf_counter() - first)
        llm.reset()
        return {"rate": rate, "tokens": tokens[:32]}

    def prefill(ids: list[int]) -> float:
        start = time.perf_counter()
        llm.eval(ids)
        seconds = time.perf_counter() - start
        llm.reset()
        return seconds

    return decode, prefill


def direct_runtime(folder: Path, engine: str, threads: int, cache_dir: Path) -> Decode:
    """The engine the server runs, called without HTTP, tokenizing or streaming (its own process:
    once torch has run a parallel op on a process's main thread, decode on every other thread of
    that process ran 2.5x slower here with llama.cpp; the cause is not found)."""
    import torch

    from autoglm_inference.artifact import load
    from autoglm_inference.engine import Engine, Job, run_jobs

    torch.set_num_threads(threads)
    loaded = load(str(folder), cache_dir=cache_dir, engine=engine)
    if loaded.engine == "llama.cpp":
        from autoglm_inference.llamacpp import LlamaCppRuntime

        runtime: object = LlamaCppRuntime(loaded.model.path, max_rows=1, context=2048, threads=threads)
    else:
        from autoglm_inference.runtime import TorchRuntime
        from autoglm_modeling.quantization import run_activations_in_fp32

        run_activations_in_fp32(loaded.model)
        runtime = TorchRuntime(loaded.model)
    engine_ = Engine(runtime, max_batch_size=1).start()  # type: ignore[arg-type]

    def decode(ids: list[int], n: int) -> dict[str, object]:
        (job,) = run_jobs(engine_, [Job(list(ids), n)])
        assert job.first_token_at is not None
        assert job.finished_at is not None
        rate = (len(job.generated) - 1) / (job.finished_at - job.first_token_at)
        return {"rate": rate, "tokens": job.generated[:32]}

    return decode


# -- the report -----------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(rows: list[Row], anchors: dict[str, Row], args: argparse.Namespace) -> None:
    print()
    header = f"{'runtime / variant':<22}{'engine':<11}{'MB':>6}{'decode tok/s':>14}{'direct':>9}{'prefill tok/s':>15}{f'{args.clients} clients':>12}{'vs llama.cpp (decode, prefill, clients)':>42}{'same 32 tokens':>16}"
    print(header)
    print("-" * len(header))
    for kind, anchor in anchors.items():
        print(line(anchor, None))
        for row in rows:
            if row.engine == "llama.cpp" and row.bits == kind:
                print(line(row, anchor))
    for row in rows:
        if row.engine == "torch":
            print(line(row, anchors.get(row.bits)))
    print()
    ours = [r for r in rows if r.engine == "llama.cpp"]
    if ours and anchors:
        worst = min(decode_ratio(r, anchors[r.bits]) for r in ours)
        print(
            f"llama.cpp engine through autoglm serve, worst decode ratio to llama.cpp at the same bits: {worst:.2f}x"
        )
        for row in ours:
            rounds = " ".join(f"{r:.2f}" for r in row.paired)
            print(
                f"{row.name}: each round's decode through the server / llama.cpp's: {rounds} (median {med(row.paired):.2f}x)"
            )
    torch_rows = [r for r in rows if r.engine == "torch" and r.bits in anchors]
    if torch_rows:
        best = max(med(r.decode) / med(anchors[r.bits].decode) for r in torch_rows)
        print(f"torch engine, best decode ratio to llama.cpp at the same bits: {best:.2f}x")
    for row in rows:
        if row.engine != "anchor" and row.direct and row.decode:
            print(
                f"{row.name} ({row.engine}): streamed through the server / called directly = {med(row.decode) / med(row.direct):.2f}x"
            )


def decode_ratio(row: Row, anchor: Row) -> float:
    """Measured in the same rounds: the median of the rounds' ratios; else the ratio of medians."""
    return med(row.paired) if row.paired else med(row.decode) / med(anchor.decode)


def line(row: Row, anchor: Row | None) -> str:
    ratios = same = ""
    if anchor is not None:
        ratios = f"{decode_ratio(row, anchor):.2f}x  {med(row.prefill) / med(anchor.prefill):.2f}x  {row.clients / anchor.clients:.2f}x"
        same = (
            "yes"
            if row.tokens == anchor.tokens
            else f"first {next((i for i, (a, b) in enumerate(zip(row.tokens, anchor.tokens, strict=False)) if a != b), 32)}"
        )
    return (
        f"{row.name:<22}{row.engine:<11}{row.size_mb:>6.0f}{med(row.decode):>14.1f}{med(row.direct):>9.1f}"
        f"{med(row.prefill):>15.0f}{row.clients:>12.1f}{ratios:>42}{same:>16}"
    )


def cpu_flags() -> set[str]:
    try:
        for text_line in Path("/proc/cpuinfo").read_text().splitlines():
            if text_line.startswith(("flags", "Features")):
                return set(text_line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        for text_line in Path("/proc/cpuinfo").read_text().splitlines():
            if text_line.startswith("model name"):
                return text_line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        worker(sys.argv[2], json.loads(sys.argv[3]))
    else:
        main()
