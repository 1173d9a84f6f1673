"""``autoglm agent`` against a real ``autoglm serve``: the server ends up serving what the ConfigMap's
document says, pulled into the node cache and verified first; a corrupt artifact or a server that is
down is an error in the status, and the server keeps serving its stable revision."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from autoglm_core.card import MODEL_CARD
from autoglm_inference.process import ServerProcess, free_port
from autoglm_operator.backends.local_serving import LocalServing
from autoglm_operator.plan import Serving
from tests.support.tiny_models import published_tiny_glms

pytestmark = pytest.mark.integration


def _card_digest(folder: Path) -> str:
    import hashlib

    return hashlib.sha256((folder / MODEL_CARD).read_bytes()).hexdigest()


def _assignment(folder: Path, revision: str, weight: int = 100) -> dict[str, Any]:
    return {"revision": revision, "uri": folder.as_uri(), "sha256": _card_digest(folder), "weight": weight}


def _agent(config: Path, server: ServerProcess, cache: Path, status: Path) -> tuple[int, dict[str, Any], str]:
    command = [sys.executable, "-m", "autoglm_operator", "agent", "--once", "--config", str(config),
               "--server", server.url, "--cache-dir", str(cache), "--status-file", str(status)]  # fmt: skip
    env = {"AUTOGLM_ADMIN_TOKEN": server.admin_token or "", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert status.is_file(), done.stdout + done.stderr
    return done.returncode, json.loads(status.read_text()), done.stdout + done.stderr


def test_the_agent_swaps_its_server_to_the_configmaps_revisions(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    folders = published_tiny_glms(artifacts, {"a": 1, "b": 2, "c": 3})
    config, status, cache = tmp_path / "desired.json", tmp_path / "status.json", tmp_path / "cache"
    server = ServerProcess(
        "m-edge",
        str(folders["a"]),
        log=tmp_path / "server.log",
        admin_token="s3cret",
        model_roots=[artifacts],
    ).wait_ready()
    backend = LocalServing("m-edge", server.url, headers=server.admin_headers)

    def desired(stable: dict[str, Any], candidate: dict[str, Any] | None = None, generation: int = 1) -> None:
        document = {"model": "m", "served": "m-edge", "target": "edge", "generation": generation,
                    "stable": stable, "candidate": candidate}  # fmt: skip
        config.write_text(json.dumps(document))

    try:
        a, b, c = (_assignment(folders[n], f"rev-{n}") for n in "abc")
        desired(a)
        code, state, output = _agent(config, server, cache, status)
        assert (code, state["applied"], state["error"]) == (0, [], None), output  # in sync: nothing to do

        desired(a, {**b, "weight": 10}, generation=2)
        code, state, output = _agent(config, server, cache, status)
        assert code == 0, output
        assert state["applied"] == ["load-canary rev-b"]
        assert state["served"] == {"stable": "rev-a", "canary": "rev-b", "weight": 10}
        assert state["generation"] == 2
        assert backend.observe() == Serving("rev-a", "rev-b", 10)

        desired(a, {**b, "weight": 50})
        assert _agent(config, server, cache, status)[1]["applied"] == ["weight rev-b"]
        desired({**b, "weight": 100})  # promoted: the candidate becomes stable where it is warm
        assert _agent(config, server, cache, status)[1]["applied"] == ["promote rev-b"]
        assert backend.observe() == Serving(stable="rev-b")

        # A corrupt artifact: the server's load refuses it, stable keeps serving, the error names it.
        broken = artifacts / "broken-c"
        shutil.copytree(folders["c"], broken)
        weights = next(broken.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
        desired({**b, "weight": 100}, {**_assignment(broken, "rev-c"), "weight": 10})
        code, state, output = _agent(config, server, cache, status)
        assert code == 1
        assert "load-canary rev-c" in state["error"]
        assert "model card says" in state["error"]
        assert state["served"] == {"stable": "rev-b", "canary": None, "weight": 0}

        # A stable swap straight to a revision the server has not loaded: atomic, verified first.
        desired({**c, "weight": 100})
        code, state, output = _agent(config, server, cache, status)
        assert code == 0, output
        assert state["applied"] == ["load-stable rev-c"]
        assert backend.observe() == Serving(stable="rev-c")
    finally:
        server.stop()


def test_a_server_that_is_down_is_an_error_in_the_status_not_a_crash(tmp_path: Path) -> None:
    folders = published_tiny_glms(tmp_path / "artifacts", {"a": 1})
    config, status = tmp_path / "desired.json", tmp_path / "status.json"
    config.write_text(json.dumps({"model": "m", "stable": _assignment(folders["a"], "rev-a")}))
    command = [sys.executable, "-m", "autoglm_operator", "agent", "--once", "--config", str(config),
               "--server", f"http://127.0.0.1:{free_port()}", "--status-file", str(status)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    state = json.loads(status.read_text())
    assert "did not answer" in state["error"]
    assert state["served"] is None


def test_a_desired_state_that_is_not_one_names_what_is_wrong(tmp_path: Path) -> None:
    config = tmp_path / "desired.json"
    config.write_text(json.dumps({"model": "m", "stable": {"revision": "a", "uri": "x", "weight": 300}}))
    command = [sys.executable, "-m", "autoglm_operator", "agent", "--once", "--config", str(config),
               "--server", f"http://127.0.0.1:{free_port()}"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert "stable.weight must be an integer in 0..100, got 300" in done.stdout + done.stderr
