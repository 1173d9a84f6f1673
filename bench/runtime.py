"""CPU runtimes side by side, in one run: our engines behind ``autoglm serve`` against llama.cpp itself.

SmolLM2-135M-Instruct, greedy, the same threads everywhere (``--threads``, default 2). For every
variant the pipeline publishes for a CPU target:

- **ours, llama.cpp engine**: each GGUF kind the pipeline publishes for a CPU target (``formats.
  GGUF_KINDS``: F32, F16, BF16, Q8_0, Q4_0), made as the compress step makes it (an F32 export, then
  llama.cpp's own quantizer), served by ``autoglm serve --engine llama.cpp``;
- **ours, torch engine**: fp32, int8 and int4 (g32) weight-only, what a CPU target gets where
  llama.cpp is not installed, served by ``autoglm serve --engine torch``;
- **anchors**, on the same GGUF file:
  - **llama-server**: llama.cpp's own HTTP server (``make install-llama-server``: the llama.cpp this
    llama-cpp-python release vendors, the same build flags), streamed as ours is: llama.cpp as a
    client sees it. ``-np`` = ``--clients`` slots, one unified KV cache of 8192 cells as ours;
  - **in-process**: llama-cpp-python's own ``Llama`` (its generate loop, one sequence, no HTTP);
  both with flash attention on, as llama.cpp's own tools default to on a CPU (and as our engine runs).
- **ours, with events gathered**: the same server with ``--stream-interval-ms`` (``--interval-ms``,
  default 50): a streamed event at most that often, several tokens each.
- **sampled**: in every round, our server and llama-server also stream one sampled completion
  (``--sample``, default temperature 0.7 and top-p 0.9, the round's seed; llama-server told to apply
  only those two, in that order, as ours does: ``samplers: [temperature, top_p]``, no top-k, min-p or
  typical-p), and its ratio to llama-server's is printed as greedy decode's is.

Measured for each: batch-1 decode tokens/s streamed as a client sees it (median of ``--reps``
rounds; tokens after the first over the time after the first), the same engine called without HTTP,
prefill tokens/s (a ~600-token prompt: prompt tokens / time to first token), and 16-client
throughput (closed loop, 64 new tokens each). Every runtime of one kind is loaded at once, each in
its own process, and they take turns in rounds; a decode ratio is the median of the rounds' ratios.
llama.cpp's ``Llama`` decodes one sequence at a time, so its 16-client figure is its batch-1 rate.

Each kind's runtimes are loaded ``--loads`` times afresh, in new processes, ``--reps`` rounds each: a
process keeps its own luck for its lifetime (two loads of the very same server, 14 alternating rounds,
read 0.953x of each other, 95% interval 0.928-0.993, where another pair read 1.018x). So the interval
that counts is the one over the loads' medians, all kinds pooled; the one over rounds is printed
beside it. ``--control`` adds a second llama-server, measured against the first as ours is: what
"below" or "above" the same runtime reads in that run.

    python bench/runtime.py [--threads 2] [--tokens 128] [--clients 16] [--reps 5] [--loads 2]
                            [--interval-ms 50] [--control] [--sample 0.7,0.9|none]
                            [--only gguf|torch] [--kinds Q8_0,Q4_0]

Without llama-cpp-python (``make install-llamacpp``) only the torch rows are measured, and without
``llama-server`` its rows; it says so.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.client
import json
import logging
import math
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

from serving_common import COMPLETIONS, MODEL, TEXT, closed_loop, int8_artifact, prompts
from stats import describe_ratios, group_medians

from autoglm_core.card import MODEL_CARD, write_model_card
from autoglm_core.paths import DEFAULT_CACHE_DIR
from autoglm_core.uris import resolve
from autoglm_inference.process import ServerProcess, free_port, terminate
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
    paired: list[float] = field(default_factory=list)  # each round's rate / llama-server's
    in_process: list[float] = field(default_factory=list)  # each round's rate / llama.cpp in-process
    direct: list[float] = field(default_factory=list)  # the same engine in-process
    prefill: list[float] = field(default_factory=list)
    clients: float = float("nan")
    tokens: list[int] = field(default_factory=list)  # the first greedy tokens, for the same-output check
    gathered: bool = False  # our server with --stream-interval-ms (several tokens an event)
    loads: list[int] = field(default_factory=list)  # the load each round of the ratios ran in
    sampled: list[float] = field(default_factory=list)  # sampled decode through the server (--sample)
    sampled_paired: list[float] = field(default_factory=list)  # each round's sampled rate / llama-server's
    sampled_tokens: list[int] = field(default_factory=list)  # tokens each sampled answer had
    sampled_loads: list[int] = field(default_factory=list)  # the load of each paired sampled round
    sampled_unpaired: int = 0  # sampled rounds left out: our answer ended (EOS) before --tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per batch-1 decode run")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5, help="rounds per load (each runtime once per round)")
    parser.add_argument("--loads", type=int, default=2,
                        help="times each kind's runtimes are loaded afresh, in new processes (--reps rounds each)")  # fmt: skip
    parser.add_argument("--control", action="store_true",
                        help="also a second llama-server, measured against the first as ours is (an A/A check)")  # fmt: skip
    parser.add_argument("--interval-ms", type=float, default=50.0,
                        help="--stream-interval-ms of the second server of each GGUF kind (0: none)")  # fmt: skip
    parser.add_argument("--sample", type=sampling_arg, default=(0.7, 0.9),
                        help="temperature,top_p of a sampled decode per round against llama-server (none: skip)")  # fmt: skip
    parser.add_argument("--only", choices=["gguf", "torch"], default=None)
    parser.add_argument("--kinds", type=lambda v: v.split(","), default=list(GGUF_KINDS),
                        help=f"GGUF kinds to measure, comma-separated (default: all, {','.join(GGUF_KINDS)})")  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args()
    if args.loads < 1 or args.reps < 1:
        parser.error("--loads and --reps are at least 1")
    if unknown := sorted(set(args.kinds) - set(GGUF_KINDS)):
        parser.error(f"--kinds: {', '.join(unknown)} not published; choose from {', '.join(GGUF_KINDS)}")
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
    elif llama_server_binary() is None:
        print("llama-server is not installed (make install-llama-server): its rows are skipped")
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
    http_anchors: dict[str, Row] = {}
    controls: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        if have_llama and args.only != "torch":
            for kind in (k for k in GGUF_KINDS if k in args.kinds):
                folder = gguf_artifact(args.cache_dir, source, kind)
                measured = measure_kind(
                    folder, folder / "model.gguf", "llama.cpp", kind, kind, ids, long_ids, args, logs, texts
                )
                rows += measured.ours
                assert measured.anchor is not None
                anchors[kind] = measured.anchor
                if measured.http_anchor is not None:
                    http_anchors[kind] = measured.http_anchor
                if measured.control is not None:
                    controls.append(measured.control)
        if args.only != "gguf":
            for variant, bits in TORCH_VARIANTS.items():
                folder = torch_artifact(args.cache_dir, source, variant)
                rows += measure_kind(
                    folder, None, "torch", variant, bits, ids, long_ids, args, logs, texts
                ).ours
    report(rows, anchors, http_anchors, controls, args)


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


@dataclass
class Measured:
    ours: list[Row]  # the server (and, for GGUF, the server gathering events)
    anchor: Row | None  # llama.cpp in-process
    http_anchor: Row | None  # llama-server
    control: Row | None = None  # a second llama-server against the first (--control)


def measure_kind(
    folder: Path, anchor_path: Path | None, engine: str, name: str, bits: str,
    ids: list[int], long_ids: list[int], args: argparse.Namespace, logs: Path, texts: tuple[str, str],
) -> Measured:  # fmt: skip
    """Our server and engine on ``folder`` and, given ``anchor_path``, llama.cpp itself on it (in-process
    and, where installed, its own server), their repetitions interleaved; every runtime is loaded
    ``--loads`` times afresh, ``--reps`` rounds each."""
    row = Row(f"ours {name}", engine, bits, size_mb(folder))
    gathered = (
        Row(f"ours {name}, {args.interval_ms:g} ms", engine, bits, row.size_mb, gathered=True)
        if anchor_path is not None and args.interval_ms > 0
        else None
    )
    anchor = (
        Row(f"llama.cpp {bits}", "in-process", bits, anchor_path.stat().st_size / 1e6)
        if anchor_path
        else None
    )
    binary = llama_server_binary() if anchor_path is not None else None
    http_anchor = (
        Row(f"llama-server {bits}", "llama-server", bits, anchor.size_mb) if binary and anchor else None
    )
    control = (
        Row(f"llama-server {bits} (2)", "llama-server", bits, anchor.size_mb)
        if http_anchor is not None and args.control
        else None
    )
    rows = Measured([row] + ([gathered] if gathered is not None else []), anchor, http_anchor, control)
    for load in range(args.loads):
        measure_load(rows, folder, anchor_path, binary, engine, name, ids, long_ids, args, logs, texts,
                     load=load, clients=load == args.loads - 1)  # fmt: skip
    if anchor is not None:
        anchor.direct = anchor.decode
        anchor.clients = statistics.median(anchor.decode)  # one sequence at a time
    return rows


def measure_load(
    rows: Measured, folder: Path, anchor_path: Path | None, binary: Path | None, engine: str, name: str,
    ids: list[int], long_ids: list[int], args: argparse.Namespace, logs: Path, texts: tuple[str, str],
    *, load: int, clients: bool,
) -> None:  # fmt: skip
    """One load: every runtime started in its own process, ``--reps`` rounds, and (``clients``) the
    16-client throughput; then every process stops."""
    common = {"ids": ids, "long_ids": long_ids, "threads": args.threads, "tokens": args.tokens,
              "cache_dir": str(args.cache_dir)}  # fmt: skip
    row, gathered = rows.ours[0], (rows.ours[1] if len(rows.ours) > 1 else None)
    anchor, http_anchor, control = rows.anchor, rows.http_anchor, rows.control
    workers: dict[str, Worker] = {}
    servers: dict[str, ServerProcess] = {}
    llama_servers: dict[str, LlamaServer] = {}
    serve_args = ["--engine", engine, "--max-batch-size", str(args.clients), "--max-prompt-tokens", "4096"]
    try:
        if anchor_path is not None:
            workers["anchor"] = Worker("anchor", {**common, "path": str(anchor_path)})
        workers["direct"] = Worker("direct", {**common, "folder": str(folder), "engine": engine})
        servers["server"] = ServerProcess(
            "smol", str(folder), *serve_args, log=logs / f"{engine}-{name}.log", threads=args.threads
        ).wait_ready(300)
        if gathered is not None:
            servers["gathered"] = ServerProcess(
                "smol", str(folder), *serve_args, "--stream-interval-ms", f"{args.interval_ms:g}",
                log=logs / f"{engine}-{name}-gathered.log", threads=args.threads,
            ).wait_ready(300)  # fmt: skip
        if binary is not None and anchor_path is not None and http_anchor is not None:
            for key in ("llama-server", "control") if control is not None else ("llama-server",):
                llama_servers[key] = LlamaServer(
                    binary, anchor_path, args.threads, args.clients, logs / f"{key}-{name}.log"
                )
        runs: dict[str, Callable[[], dict[str, object]]] = {
            "direct": lambda: workers["direct"].ask("decode"),
            **{
                key: (lambda s=server: stream(s.url, texts[0], args.tokens))
                for key, server in servers.items()
            },
            **{key: (lambda s=server: s.stream(ids, args.tokens)) for key, server in llama_servers.items()},
        }
        if anchor is not None:
            runs["anchor"] = lambda: workers["anchor"].ask("decode")
        order = list(runs)
        # Warm-up: one whole decode each (the workers did theirs when they loaded). A process's first
        # decodes here ran at a third of its later rate for seconds, whichever runtime it was.
        for server in servers.values():
            stream(server.url, texts[0], args.tokens)
        for llama_server in llama_servers.values():
            llama_server.stream(ids, args.tokens)
        settle()
        for round_ in range(args.reps):
            turned = order[round_ % len(order) :] + order[: round_ % len(order)]
            rates: dict[str, float] = {}
            for runtime in turned:
                answer = runs[runtime]()
                settle()
                rates[runtime] = float(answer["rate"])  # type: ignore[arg-type]
                if runtime == "direct":  # the server's route gives text, not token ids
                    row.tokens = list(answer["tokens"])  # type: ignore[call-overload]
                elif runtime == "anchor" and anchor is not None:
                    anchor.tokens = list(answer["tokens"])  # type: ignore[call-overload]
                elif runtime == "llama-server" and http_anchor is not None:
                    http_anchor.tokens = list(answer["tokens"])  # type: ignore[call-overload]
            row.direct.append(rates["direct"])
            for key, ours in (("server", row), ("gathered", gathered), ("control", control)):
                if ours is None:
                    continue
                ours.decode.append(rates[key])
                ours.loads.append(load)
                if anchor is not None:
                    ours.in_process.append(rates[key] / rates["anchor"])
                if http_anchor is not None:
                    ours.paired.append(rates[key] / rates["llama-server"])
            if anchor is not None:
                anchor.decode.append(rates["anchor"])
                anchor.prefill.append(float(workers["anchor"].ask("prefill")["rate"]))  # type: ignore[arg-type]
                settle()
            if http_anchor is not None and "llama-server" in llama_servers:
                http_anchor.decode.append(rates["llama-server"])
                ttft = llama_servers["llama-server"].stream(long_ids, 1)["ttft"]
                http_anchor.prefill.append(len(long_ids) / float(ttft))  # type: ignore[arg-type]
                settle()
            # Both servers' prefill in turns too: timed in a fixed order, the second read 3-8% faster.
            pair = [("server", row), ("gathered", gathered)]
            for key, ours in pair[round_ % 2 :] + pair[: round_ % 2]:
                if ours is not None:
                    ours.prefill.append(len(long_ids) / float(stream(servers[key].url, texts[1], 1)["ttft"]))  # type: ignore[arg-type]
                    settle()
            if args.sample is not None and "llama-server" in llama_servers:
                temperature, top_p = args.sample
                seed = 1000 * load + round_
                sampled = {
                    "server": functools.partial(stream, servers["server"].url, texts[0]),
                    "llama-server": functools.partial(llama_servers["llama-server"].stream, ids),
                }
                answers: dict[str, dict[str, object]] = {}
                for key in list(sampled)[round_ % 2 :] + list(sampled)[: round_ % 2]:
                    answers[key] = sampled[key](args.tokens, temperature, top_p, seed)
                    settle()
                row.sampled_tokens.append(int(answers["server"]["completion"]))  # type: ignore[call-overload]
                # Only rounds where both ran all their tokens are paired (llama-server is told to ignore
                # its end-of-text token, ours cannot be): a shorter answer decodes over a shorter context.
                if {answers[key]["completion"] for key in answers} != {args.tokens}:
                    row.sampled_unpaired += 1
                    continue
                row.sampled.append(float(answers["server"]["rate"]))  # type: ignore[arg-type]
                row.sampled_paired.append(row.sampled[-1] / float(answers["llama-server"]["rate"]))  # type: ignore[arg-type]
                row.sampled_loads.append(load)
        for worker in workers.values():  # nothing else runs while a server is loaded by 16 clients
            worker.close()
        if not clients:
            return
        loads = [(row, servers["server"].url, COMPLETIONS)]
        if gathered is not None:
            loads.append((gathered, servers["gathered"].url, COMPLETIONS))
        if http_anchor is not None and "llama-server" in llama_servers:
            loads.append((http_anchor, llama_servers["llama-server"].url, "/v1/completions"))
        for target, url, path in loads:
            settle()
            load_test = asyncio.run(
                closed_loop(url, "smol", prompts(args.cache_dir, 64), clients=args.clients, max_tokens=64,
                            requests_per_client=2, path=path)
            )  # fmt: skip
            if load_test.failed:
                raise SystemExit(
                    f"{target.name}: {load_test.failed} of {load_test.ok + load_test.failed} requests failed: "
                    f"{load_test.errors[:2]}"
                )
            target.clients = load_test.tokens / load_test.seconds
    finally:
        for worker in workers.values():
            worker.close()
        for server in servers.values():
            server.stop()
        for llama_server in llama_servers.values():
            llama_server.stop()


def settle(seconds: float = 0.3) -> None:
    """Wait before the next runtime's turn: a polling ggml thread pool spins for about 85 ms after its
    last graph here (llama-server's; ours pauses when its engine idles), and the runtime timed next
    would share the two cores with it. Before this wait, our server's prefill, timed right after
    llama-server's, read 0.93-0.97x of it; timed alone its time to first token equalled the engine's
    own prefill (977 against 983 ms, 660 tokens, Q8_0)."""
    time.sleep(seconds)


def llama_server_binary() -> Path | None:
    """``llama-server`` as ``make install-llama-server`` puts it beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "llama-server"
    found = beside if beside.is_file() else shutil.which("llama-server")
    return Path(found) if found else None


class LlamaServer:
    """llama.cpp's own HTTP server on one GGUF file, as the anchor a client sees: ``-np`` slots
    decoding together (continuous batching), one unified KV cache of 8192 cells as ours, flash
    attention on, ``threads`` threads for decode and prefill."""

    def __init__(self, binary: Path, path: Path, threads: int, slots: int, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            str(binary), "-m", str(path), "-t", str(threads), "-tb", str(threads), "-c", "8192",
            "-np", str(slots), "-kvu", "-fa", "on", "-b", "512", "-ub", "512",
            "--host", "127.0.0.1", "--port", str(self.port), "--no-webui",
        ]  # fmt: skip
        self._log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(
                    f"llama-server exited with {self.process.returncode}: {log.read_text()[-2000:]}"
                )
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            finally:
                connection.close()
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"llama-server was not ready in 300 s: {log.read_text()[-2000:]}")

    def stream(
        self, ids: list[int], n: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0
    ) -> dict[str, object]:
        """One streamed completion of the token ids ``ids`` (its native route, which takes ids and
        returns them), timed as ``stream`` times ours: greedy, or sampled as ours samples (temperature,
        then top-p; every other sampler off) for ``n`` tokens."""
        request: dict[str, object] = {"prompt": ids, "n_predict": n, "temperature": temperature, "stream": True,
                                      "return_tokens": True, "cache_prompt": False}  # fmt: skip
        if temperature > 0:
            request |= {"top_p": top_p, "top_k": 0, "min_p": 0.0, "typical_p": 1.0, "seed": seed,
                        "samplers": ["temperature", "top_p"], "ignore_eos": True}  # fmt: skip
        body = json.dumps(request)
        reads = read_stream(self.url, "/completion", body)
        first = last = 0.0
        tokens: list[int] = []
        for at, event in events(reads):
            if event.get("tokens"):
                tokens += event["tokens"]
                last = at
                first = first or at
        return {"ttft": first - reads.start, "rate": decode_rate(len(tokens), first, last),
                "completion": len(tokens), "tokens": tokens[:32]}  # fmt: skip

    def stop(self) -> None:
        terminate(self.process)
        self._log.close()


def stream(
    url: str, prompt: str, n: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0
) -> dict[str, object]:
    """One streamed completion of ``prompt`` as a client sees it (greedy, or sampled with ``seed``):
    time to first token, decode tokens/s after the first, and how many tokens it generated."""
    request = {"model": "smol", "prompt": prompt, "max_tokens": n, "temperature": temperature, "stream": True,
               "stream_options": {"include_usage": True}}  # fmt: skip
    if temperature > 0:
        request |= {"top_p": top_p, "seed": seed}
    body = json.dumps(request)
    reads = read_stream(url, COMPLETIONS, body)
    first = last = 0.0
    completion = 0
    for at, event in events(reads):
        if event.get("usage"):
            completion = int(event["usage"]["completion_tokens"])
        elif event["choices"] and event["choices"][0].get("text"):
            last = at
            first = first or at
    return {
        "ttft": first - reads.start,
        "rate": decode_rate(completion, first, last),
        "completion": completion,
    }


def decode_rate(tokens: int, first: float, last: float) -> float:
    """Tokens after the first over the time after the first (the first token's time is prefill's)."""
    return (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")


@dataclass
class Reads:
    start: float
    reads: list[tuple[float, bytes]]


def read_stream(url: str, path: str, body: str) -> Reads:
    """POST ``body`` and read the event stream as it comes, each read timed as it returns.

    The client only reads while the answer streams and parses the events afterwards (``events``): it
    shares the servers' cores, and parsing every event as it came (httpx's ``iter_lines`` and
    ``json.loads``) cost 0.45 ms of CPU per token here, 7% of a Q4_0 decode step."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=600)
    reads: list[tuple[float, bytes]] = []
    try:
        start = time.perf_counter()
        connection.request("POST", path, body, {"content-type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise SystemExit(f"{url}{path}: HTTP {response.status}: {response.read()[:500]!r}")
        while data := response.read1(65536):
            reads.append((time.perf_counter(), data))
    finally:
        connection.close()
    return Reads(start, reads)


def events(reads: Reads) -> list[tuple[float, dict[str, object]]]:
    """The server-sent events of ``reads``, each with the time the read holding its end returned."""
    found: list[tuple[float, dict[str, object]]] = []
    pending = b""
    for at, data in reads.reads:
        pending += data
        *lines, pending = pending.split(b"\n")
        found += [
            (at, json.loads(line[6:]))
            for line in lines
            if line.startswith(b"data: ") and line != b"data: [DONE]"
        ]
    return found


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
    decode(ids, args.tokens)
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


def sampling_arg(value: str) -> tuple[float, float] | None:
    """``--sample``: ``temperature,top_p``, or ``none``."""
    if value == "none":
        return None
    try:
        temperature, top_p = (float(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: give temperature,top_p (e.g. 0.7,0.9) or none"
        ) from None
    if not (temperature > 0 and 0 < top_p <= 1):
        raise argparse.ArgumentTypeError(f"{value!r}: temperature above 0 and top-p in (0, 1]")
    return temperature, top_p


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(
    rows: list[Row],
    anchors: dict[str, Row],
    http_anchors: dict[str, Row],
    controls: list[Row],
    args: argparse.Namespace,
) -> None:
    print()
    header = (
        f"{'runtime / variant':<24}{'engine':<13}{'MB':>6}{'decode tok/s':>14}{'direct':>9}{'prefill tok/s':>15}"
        f"{f'{args.clients} clients':>12}{'vs llama-server (decode, prefill, clients)':>45}"
        f"{'vs in-process (decode)':>24}{'same 32 tokens':>16}"
    )
    print(header)
    print("-" * len(header))
    for kind, anchor in anchors.items():
        print(line(anchor, None, anchor))
        http_anchor = http_anchors.get(kind)
        if http_anchor is not None:
            print(line(http_anchor, None, anchor))
        for control in controls:
            if control.bits == kind:
                print(line(control, http_anchor, anchor))
        for row in rows:
            if row.engine == "llama.cpp" and row.bits == kind:
                print(line(row, http_anchor, anchor))
    for row in rows:
        if row.engine == "torch":
            print(line(row, None, anchors.get(row.bits)))
    print()
    ours = [r for r in rows if r.engine == "llama.cpp"]
    for name, ratios in (("llama-server (llama.cpp streamed, as a client sees it)", "paired"),
                         ("llama.cpp in-process (no HTTP)", "in_process")):  # fmt: skip
        measured = [r for r in ours if getattr(r, ratios)]
        if not measured:
            continue
        print(f"decode through autoglm serve against {name}, at the same bits:")
        for row in measured:
            each = " ".join(f"{r:.2f}" for r in getattr(row, ratios))
            per_load = " ".join(f"{r:.3f}" for r in group_medians(getattr(row, ratios), row.loads))
            print(
                f"  {row.name}: each round {each}; each load's median {per_load}; {describe_ratios(getattr(row, ratios))}"
            )
        worst = min(measured, key=lambda r: med(getattr(r, ratios)))
        print(f"  worst: {worst.name} {med(getattr(worst, ratios)):.2f}x")
        groups = [(label, chosen) for label, chosen in (
            ("an event per token", [r for r in measured if not r.gathered]),
            (f"{args.interval_ms:g} ms events", [r for r in measured if r.gathered]),
            ("llama-server against itself (--control)", [r for r in controls if getattr(r, ratios)] if ratios == "paired" else []),
        ) if chosen]  # fmt: skip
        for label, chosen in groups:
            every = [x for r in chosen for x in getattr(r, ratios)]
            loads = [m for r in chosen for m in group_medians(getattr(r, ratios), r.loads)]
            print(f"  {label}, all kinds' rounds: {describe_ratios(every)}")
            print(f"  {label}, all kinds' loads ({len(loads)} load medians; the spread between processes counts): "
                  f"{describe_ratios(loads)}")  # fmt: skip
    sampled = [r for r in ours if r.sampled_paired]
    if sampled:
        temperature, top_p = args.sample
        print(f"sampled decode (temperature {temperature:g}, top-p {top_p:g}) through autoglm serve against "
              f"llama-server sampling the same way, at the same bits:")  # fmt: skip
        for row in sampled:
            each = " ".join(f"{r:.2f}" for r in row.sampled_paired)
            print(f"  {row.name}: {med(row.sampled):.1f} tok/s ({min(row.sampled_tokens)}-{max(row.sampled_tokens)} "
                  f"tokens an answer; {row.sampled_unpaired} rounds left out, ended early); each round {each}; "
                  f"{describe_ratios(row.sampled_paired)}")  # fmt: skip
        every = [x for r in sampled for x in r.sampled_paired]
        loads = [m for r in sampled for m in group_medians(r.sampled_paired, r.sampled_loads)]
        print(f"  all kinds' rounds: {describe_ratios(every)}")
        print(f"  all kinds' loads ({len(loads)} load medians): {describe_ratios(loads)}")
    torch_rows = [r for r in rows if r.engine == "torch" and r.bits in anchors]
    if torch_rows:
        best = max(med(r.decode) / med(anchors[r.bits].decode) for r in torch_rows)
        print(f"torch engine, best decode ratio to llama.cpp in-process at the same bits: {best:.2f}x")
    for row in rows:
        if row.engine != "anchor" and row.direct and row.decode:
            print(
                f"{row.name} ({row.engine}): streamed through the server / called directly = {med(row.decode) / med(row.direct):.2f}x"
            )


def line(row: Row, http_anchor: Row | None, anchor: Row | None) -> str:
    """One row; its ratios to llama-server and to llama.cpp in-process (medians of the rounds' ratios
    where they were measured in the same rounds), and whether its first greedy tokens are the in-process
    anchor's."""
    server = in_process = same = ""
    if http_anchor is not None and row is not http_anchor:
        decode = med(row.paired) if row.paired else med(row.decode) / med(http_anchor.decode)
        server = f"{decode:.2f}x  {ratio(med(row.prefill), med(http_anchor.prefill))}  {ratio(row.clients, http_anchor.clients)}"
    if anchor is not None and row is not anchor:
        in_process = f"{med(row.in_process) if row.in_process else med(row.decode) / med(anchor.decode):.2f}x"
        if row.tokens:
            first = next(
                (i for i, (a, b) in enumerate(zip(row.tokens, anchor.tokens, strict=False)) if a != b), 32
            )
            same = "yes" if row.tokens[:32] == anchor.tokens[:32] else f"first {first}"
    return (
        f"{row.name:<24}{row.engine:<13}{row.size_mb:>6.0f}{med(row.decode):>14.1f}{med(row.direct):>9.1f}"
        f"{med(row.prefill):>15.0f}{row.clients:>12.1f}{server:>45}{in_process:>24}{same:>16}"
    )


def ratio(value: float, anchor: float) -> str:
    """``1.02x``, or ``-`` where either was not measured."""
    return "-" if math.isnan(value) or math.isnan(anchor) else f"{value / anchor:.2f}x"


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
