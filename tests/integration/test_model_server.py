"""The real ``autoglm serve`` (kserve.ModelServer) on loopback: protocols, batching, limits, metrics."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from autoglm_inference.process import ServerProcess
from tests.support.tiny_models import greedy_text, tiny_glm, with_model_card

pytestmark = pytest.mark.integration

PROMPTS = [
    "To be, or not to be",
    "The king",
    "Something is rotten in the state of Denmark",
    "Words",
    "Alas, poor Yorick! I knew him",
    "Good night, sweet prince",
]
VARIANTS = """\
active: concise
variants:
  concise: "Answer in one sentence."
  detailed: "Explain step by step."
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tiny_glm(tmp_path_factory.mktemp("artifacts") / "a", init_std=0.3, seed=3)
    with_model_card(folder, "rev-a")
    return folder


@pytest.fixture(scope="module")
def variants_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("variants") / "variants.yaml"
    path.write_text(VARIANTS)
    return path


@pytest.fixture(scope="module")
def server(
    artifact: Path, variants_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    proc = ServerProcess(
        "tiny", str(artifact),
        "--max-batch-size", "8", "--max-batch-delay-ms", "30", "--max-new-tokens", "64",
        "--max-prompt-tokens", "48", "--max-body-bytes", "4096", "--prompt-variants", str(variants_file),
        "--target", "edge",
        log=log,
    ).wait_ready()  # fmt: skip
    yield proc
    assert proc.alive, f"the server died:\n{log.read_text()[-3000:]}"
    assert proc.stop() == 0


def test_v1_predict_returns_greedy_text_and_the_join_headers(server: ServerProcess, artifact: Path) -> None:
    body = {"instances": [{"prompt": PROMPTS[0], "max_tokens": 12}, {"prompt": PROMPTS[1], "max_tokens": 5}]}
    r = httpx.post(
        f"{server.url}/v1/models/tiny:predict", json=body, headers={"x-request-id": "req-1"}, timeout=60
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "req-1"
    assert r.headers["x-autoglm-revision"] == "rev-a"
    assert r.headers["x-autoglm-prompt-variant"] == "none"
    predictions = r.json()["predictions"]
    assert [p["text"] for p in predictions] == [
        greedy_text(artifact, PROMPTS[0], 12),
        greedy_text(artifact, PROMPTS[1], 5),
    ]
    assert all(
        p["energy_joules"] > 0 and p["energy_method"] in ("rapl", "cpu-time-model") for p in predictions
    )
    assert predictions[0]["prompt_tokens"] > 0


def test_v2_infer_ready_and_metadata(server: ServerProcess, artifact: Path) -> None:
    body = {
        "id": "v2-1",
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [2], "data": PROMPTS[2:4]}],
        "parameters": {"max_tokens": 7},
    }
    r = httpx.post(f"{server.url}/v2/models/tiny/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = {o["name"]: o["data"] for o in r.json()["outputs"]}
    assert out["text_output"] == [greedy_text(artifact, p, 7) for p in PROMPTS[2:4]]
    assert r.json()["id"] == "v2-1"
    assert r.json()["model_version"] == "rev-a"
    assert httpx.get(f"{server.url}/v2/models/tiny/ready").status_code == 200
    meta = httpx.get(f"{server.url}/v2/models/tiny").json()
    assert meta["inputs"][0]["name"] == "text_input"
    assert httpx.get(f"{server.url}/v2/models/nope/ready").status_code == 404


def test_openai_completion_streaming_equals_the_whole_answer(server: ServerProcess, artifact: Path) -> None:
    body = {"model": "tiny", "prompt": PROMPTS[4], "max_tokens": 20, "temperature": 0}
    whole = httpx.post(f"{server.url}/openai/v1/completions", json=body, timeout=60)
    assert whole.status_code == 200, whole.text
    text = whole.json()["choices"][0]["text"]
    assert text == greedy_text(artifact, PROMPTS[4], 20)
    assert whole.json()["usage"]["completion_tokens"] > 0
    with httpx.stream(
        "POST", f"{server.url}/openai/v1/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-autoglm-revision"] == "rev-a"
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 2  # streamed, not one lump
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_chat_applies_the_active_prompt_variant_unless_pinned(server: ServerProcess) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Who is Hamlet?"}], "max_tokens": 6}
    r = httpx.post(f"{server.url}/openai/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-autoglm-prompt-variant"] == "concise"
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    pinned = httpx.post(
        f"{server.url}/openai/v1/chat/completions",
        json=body,
        headers={"x-autoglm-prompt-variant": "detailed"},
    )
    assert pinned.headers["x-autoglm-prompt-variant"] == "detailed"
    own_system = {**body, "messages": [{"role": "system", "content": "Be brief."}, *body["messages"]]}
    assert (
        httpx.post(f"{server.url}/openai/v1/chat/completions", json=own_system).headers[
            "x-autoglm-prompt-variant"
        ]
        == "none"
    )
    unknown = httpx.post(f"{server.url}/openai/v1/chat/completions", json={**body, "prompt_variant": "nope"})
    assert unknown.status_code == 400
    assert "concise" in unknown.json()["error"]
    with httpx.stream("POST", f"{server.url}/openai/v1/chat/completions", json={**body, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_switching_the_active_variant_in_the_file_takes_effect(
    server: ServerProcess, variants_file: Path
) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    tmp = variants_file.with_suffix(".tmp")
    tmp.write_text(VARIANTS.replace("active: concise", "active: detailed"))
    tmp.replace(variants_file)
    try:
        r = httpx.post(f"{server.url}/openai/v1/chat/completions", json=body)
        assert r.headers["x-autoglm-prompt-variant"] == "detailed"
        variants_file.write_text("active: [broken")  # a bad file keeps the last good variants
        r = httpx.post(f"{server.url}/openai/v1/chat/completions", json=body)
        assert r.status_code == 200
        assert r.headers["x-autoglm-prompt-variant"] == "detailed"
    finally:
        variants_file.write_text(VARIANTS)


def test_concurrent_requests_are_batched_and_equal_unbatched_greedy(
    server: ServerProcess, artifact: Path
) -> None:
    lengths = [24, 6, 17, 30, 3, 11]
    barrier = threading.Barrier(len(PROMPTS))

    def one(i: int) -> str:
        barrier.wait()
        body = {"model": "tiny", "prompt": PROMPTS[i], "max_tokens": lengths[i]}
        r = httpx.post(f"{server.url}/openai/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(one, range(len(PROMPTS))))
    assert texts == [greedy_text(artifact, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    metrics = httpx.get(f"{server.url}/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith("autoglm_batch_size_sum")]
    counts = [line for line in metrics.splitlines() if line.startswith("autoglm_batch_size_count")]
    assert float(sizes[0].rsplit(" ", 1)[1]) > float(
        counts[0].rsplit(" ", 1)[1]
    )  # some batch held > 1 request


@pytest.mark.parametrize(
    ("body", "status", "limit"),
    [
        ({"model": "tiny", "prompt": "word " * 200, "max_tokens": 2}, 400, "max_prompt_tokens"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 65}, 400, "max_new_tokens"),
        ({"model": "tiny", "prompt": "x" * 5000, "max_tokens": 2}, 413, "max_body_bytes"),
    ],
)
def test_limits_answer_with_the_limit_named(
    server: ServerProcess, body: dict, status: int, limit: str
) -> None:
    r = httpx.post(f"{server.url}/openai/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert r.json()["limit"] == limit
    assert limit in r.json()["error"]
    assert r.headers["x-request-id"]


def test_a_chunked_body_over_the_limit_gets_413(server: ServerProcess) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(
        f"{server.url}/openai/v1/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    assert r.json()["limit"] == "max_body_bytes"


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/openai/v1/completions", b"{not json", "not valid JSON"),
        ("/openai/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": -1}', "max_tokens"),
        ("/openai/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": 9}', "temperature"),
        ("/openai/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": "0.5"}', "temperature"),
        ("/openai/v1/completions", b'{"model": "tiny", "prompt": "x", "seed": 1.5}', "seed"),
        ("/openai/v1/completions", b'{"model": "tiny", "prompt": "x", "n": 2}', "'n' must be 1"),
        (
            "/openai/v1/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "prompt_variant": ["a"]}',
            "prompt_variant",
        ),
        (
            "/v2/models/tiny/infer",
            b'{"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [5]}]}',
            "strings",
        ),
        (
            "/v2/repository/models/tiny/load",
            b'{"parameters": {"uri": "/x", "sha256": 123}}',
            "64 hexadecimal",
        ),
        (
            "/v2/repository/models/tiny/load",
            b'{"parameters": {"uri": "/x", "canaryWeight": true}}',
            "canaryWeight",
        ),
        ("/openai/v1/chat/completions", b'{"model": "tiny", "messages": "hi"}', "messages"),
        ("/v1/models/tiny:predict", b'{"instances": []}', "instances"),
        ("/v2/repository/models/tiny/load", b'{"parameters": {}}', "uri"),
    ],
)
def test_malformed_requests_get_400_naming_the_field(
    server: ServerProcess, path: str, body: bytes, needle: str
) -> None:
    r = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_metrics_carry_latency_tokens_energy_and_labels(server: ServerProcess) -> None:
    httpx.post(f"{server.url}/openai/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 3})
    # one error of its own: the errors counter is exported from its first count, and alone (or first
    # in a random order) this test must not rely on another test's bad request
    bad = httpx.post(
        f"{server.url}/openai/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": -1}
    )
    assert bad.status_code == 400
    text = httpx.get(f"{server.url}/metrics").text
    for family in (
        "autoglm_request_duration_seconds_bucket",
        "autoglm_time_to_first_token_seconds_bucket",
        "autoglm_inter_token_latency_seconds_bucket",
        "autoglm_tokens_total",
        "autoglm_batch_size_bucket",
        "autoglm_queue_depth",
        "autoglm_errors_total",
        "autoglm_energy_joules_total",
        "autoglm_energy_per_token_joules_bucket",
        "autoglm_energy_per_request_joules_bucket",
    ):
        assert family in text, family
    line = next(ln for ln in text.splitlines() if ln.startswith("autoglm_energy_joules_total"))
    assert 'model="tiny"' in line
    assert 'revision="rev-a"' in line
    assert 'target="edge"' in line
    assert 'method="cpu-time-model"' in line or 'method="rapl"' in line
    assert 'direction="out"' in text
    assert text.count("# TYPE autoglm_tokens_total") == 1


def test_the_openai_model_list_names_the_served_model(server: ServerProcess) -> None:
    assert [m["id"] for m in httpx.get(f"{server.url}/openai/v1/models").json()["data"]] == ["tiny"]


def test_an_unknown_model_is_404_naming_the_served_ones(server: ServerProcess) -> None:
    r = httpx.post(f"{server.url}/openai/v1/completions", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404
    assert "tiny" in r.json()["error"]


def test_errors_are_counted_with_the_same_labels_as_everything_else(server: ServerProcess) -> None:
    def tiny_400s() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics").text
        return {
            labels: float(value)
            for labels, _, value in (ln.rpartition(" ") for ln in text.splitlines())
            if labels.startswith("autoglm_errors_total")
            and 'code="400"' in labels
            and 'model="tiny"' in labels
        }

    before = tiny_400s()
    # Refused by the first limit checked (max_new_tokens), before any revision is chosen.
    r = httpx.post(
        f"{server.url}/openai/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 999}
    )
    assert r.status_code == 400
    after = tiny_400s()
    grown = [labels for labels, value in after.items() if value == before.get(labels, 0.0) + 1]
    assert len(grown) == 1, (before, after)
    for label in ("revision=", "prompt_variant=", 'target="edge"'):
        assert label in grown[0]


def test_a_stream_asked_for_usage_ends_with_the_token_counts(server: ServerProcess) -> None:
    body = {"model": "tiny", "prompt": PROMPTS[4], "max_tokens": 12, "temperature": 0}
    whole = httpx.post(f"{server.url}/openai/v1/completions", json=body, timeout=60).json()
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/openai/v1/completions", json=streamed, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == []
    assert last["usage"] == whole["usage"]  # the same counts as the whole answer's
