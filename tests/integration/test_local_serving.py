"""The embedded loop's serving backend carries out the core's actions on a real `autoglm serve`."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from autoglm_inference.process import ServerProcess
from autoglm_operator.backends.local_serving import LocalServing, ServingBackendError
from autoglm_operator.plan import Action, Serving
from tests.support.tiny_models import published_tiny_glms

pytestmark = pytest.mark.integration


def test_canary_weight_promote_and_rollback_through_the_repository_routes(tmp_path: Path) -> None:
    folders = published_tiny_glms(tmp_path / "artifacts", {"a": 1, "b": 2, "c": 3})
    server = ServerProcess(
        "m", str(folders["a"]), log=tmp_path / "server.log", model_roots=[tmp_path / "artifacts"]
    ).wait_ready()
    try:
        backend = LocalServing("m", server.url, headers=server.admin_headers)
        assert backend.observe() == Serving(stable="rev-a")
        backend.apply(Action("LoadCanary", "rev-b", weight=10, uri=str(folders["b"])))
        assert backend.observe() == Serving(stable="rev-a", canary="rev-b", weight=10)
        backend.apply(Action("SetWeight", "rev-b", weight=50))
        assert backend.observe() == Serving(stable="rev-a", canary="rev-b", weight=50)
        pinned = httpx.post(
            f"{server.url}/openai/v1/completions",
            json={"model": "m", "prompt": "To be", "max_tokens": 2},
            headers={"x-autoglm-revision": "rev-b"},
            timeout=60,
        )
        assert pinned.headers["x-autoglm-revision"] == "rev-b"
        backend.apply(Action("Promote", "rev-b"))
        backend.apply(Action("Unload", "rev-a"))  # retired by the promotion already: nothing to do
        assert backend.observe() == Serving(stable="rev-b")

        backend.apply(Action("LoadCanary", "rev-c", weight=10, uri=str(folders["c"])))
        backend.apply(Action("SetWeight", "rev-c", weight=0))
        backend.apply(Action("Unload", "rev-c"))  # a rollback: the canary leaves, stable stays
        assert backend.observe() == Serving(stable="rev-b")

        with pytest.raises(ServingBackendError, match="canaryWeight"):
            backend.call("weight", {"parameters": {"canaryWeight": 101}})
        backend.apply(Action("Promote", "rev-a", uri=str(folders["a"])))  # not loaded: swapped in
        assert backend.observe() == Serving(stable="rev-a")
    finally:
        assert server.stop() == 0
    with pytest.raises(ServingBackendError, match="did not answer"):
        backend.observe()
