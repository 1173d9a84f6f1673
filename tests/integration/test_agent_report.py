"""The agent reports what its server serves on its own pod, through the real Kubernetes client, and
the operator (here: the real kubectl) reads it back; a report that cannot be written never stops it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from autoglm_inference.process import free_port
from autoglm_operator.agent.report import ANNOTATION, PodReporter
from tests.support.k8s_emulator import EmulatedCluster, emulated_cluster, kubectl_binary

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(kubectl_binary() is None, reason="kubectl is not installed"),
]

POD = """apiVersion: v1
kind: Pod
metadata: {name: glm4-chat-edge-predictor-0, namespace: ml, labels: {autoglm.io/target: edge}}
spec: {containers: [{name: kserve-container, image: autoglm:0.1.0}]}
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmulatedCluster]:
    with emulated_cluster(tmp_path) as running:
        done = running.kubectl("apply", "-f", "-", stdin=POD)
        assert done.returncode == 0, done.stderr
        yield running


def _annotation(cluster: EmulatedCluster) -> dict[str, object] | None:
    done = cluster.kubectl("get", "pod", "glm4-chat-edge-predictor-0", "-n", "ml", "-o", "json")
    assert done.returncode == 0, done.stderr
    value = json.loads(done.stdout)["metadata"].get("annotations", {}).get(ANNOTATION)
    return None if value is None else json.loads(value)


def test_each_pass_is_written_on_the_agents_own_pod(cluster: EmulatedCluster, tmp_path: Path) -> None:
    config = tmp_path / "desired.json"
    desired = {"model": "glm4-chat", "served": "glm4-chat-edge", "generation": 4,
               "stable": {"revision": "rev-a", "uri": "file:///nowhere/rev-a", "weight": 100}}  # fmt: skip
    config.write_text(json.dumps(desired))
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig),
           "POD_NAME": "glm4-chat-edge-predictor-0", "POD_NAMESPACE": "ml"}  # fmt: skip
    command = [sys.executable, "-m", "autoglm_operator", "agent", "--once", "--config", str(config),
               "--server", f"http://127.0.0.1:{free_port()}"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 1  # the server is down: reported, not hidden
    state = _annotation(cluster)
    assert state is not None, done.stderr
    assert state["generation"] == 4
    assert state["served"] is None
    assert "did not answer" in str(state["error"])


def test_a_report_the_api_server_refuses_is_logged_not_raised(cluster: EmulatedCluster) -> None:
    from kubernetes import client, config

    config.load_kube_config(str(cluster.kubeconfig))
    reporter = PodReporter("no-such-pod", "ml", api=client.CoreV1Api())
    assert reporter.report({"served": None}) is False
    mine = PodReporter("glm4-chat-edge-predictor-0", "ml", api=client.CoreV1Api())
    assert mine.report({"served": {"stable": "rev-a", "canary": None, "weight": 0}}) is True
    assert _annotation(cluster) == {"served": {"stable": "rev-a", "canary": None, "weight": 0}}


def test_outside_a_pod_there_is_no_reporter() -> None:
    assert PodReporter.from_environment({}) is None
    assert PodReporter.from_environment({"POD_NAME": "p"}) is None
    reporter = PodReporter.from_environment({"POD_NAME": "p", "POD_NAMESPACE": "ml"})
    assert reporter is not None
    assert (reporter.name, reporter.namespace) == ("p", "ml")


def test_an_edge_agent_cut_off_from_the_api_server_keeps_serving_and_reports_when_it_returns(
    cluster: EmulatedCluster, tmp_path: Path
) -> None:
    """The ConfigMap is a file on the node: the agent finishes a swap it received while the link is
    down (its reports fail and are logged), and the cluster hears of it once the link is back."""
    import time
    from urllib.parse import urlparse

    import yaml

    from autoglm_inference.process import ServerProcess
    from autoglm_operator.backends.local_serving import LocalServing
    from autoglm_operator.plan import Serving
    from tests.support.link import Link
    from tests.support.tiny_models import published_tiny_glms

    folders = published_tiny_glms(tmp_path / "artifacts", {"a": 1, "b": 2})
    server = ServerProcess("glm4-chat-edge", str(folders["a"]), log=tmp_path / "server.log", admin_token="t",
                           model_roots=[tmp_path / "artifacts"]).wait_ready()  # fmt: skip
    parsed = urlparse(cluster.url)
    link = Link(parsed.hostname or "127.0.0.1", parsed.port or 80)
    kubeconfig = yaml.safe_load(cluster.kubeconfig.read_text())
    kubeconfig["clusters"][0]["cluster"]["server"] = link.url
    (tmp_path / "edge-kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    config = tmp_path / "desired.json"

    def desired(candidate: dict[str, object] | None, generation: int) -> None:
        stable = {"revision": "rev-a", "uri": folders["a"].as_uri(), "weight": 100}
        config.write_text(json.dumps({"model": "glm4-chat", "served": "glm4-chat-edge", "generation": generation,
                                      "stable": stable, "candidate": candidate}))  # fmt: skip

    def eventually(check: object, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    desired(None, 1)
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "edge-kubeconfig"), "AUTOGLM_ADMIN_TOKEN": "t",
           "POD_NAME": "glm4-chat-edge-predictor-0", "POD_NAMESPACE": "ml"}  # fmt: skip
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "autoglm_operator", "agent", "--config", str(config), "--server", server.url,
             "--cache-dir", str(tmp_path / "cache"), "--interval", "0.3"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    backend = LocalServing("glm4-chat-edge", server.url, headers=server.admin_headers)
    try:
        eventually(lambda: (_annotation(cluster) or {}).get("generation") == 1, "the first report")
        link.cut()
        desired({"revision": "rev-b", "uri": folders["b"].as_uri(), "weight": 10}, 2)
        eventually(lambda: backend.observe() == Serving("rev-a", "rev-b", 10), "the swap while cut off")
        time.sleep(1)
        assert (_annotation(cluster) or {}).get("generation") == 1  # the cluster has not heard yet
        assert "could not report" in log.read_text()
        assert agent.poll() is None  # still running, still serving
        link.restore()
        eventually(
            lambda: (_annotation(cluster) or {}).get("generation") == 2, "the report after the link returned"
        )
        assert (_annotation(cluster) or {})["served"] == {"stable": "rev-a", "canary": "rev-b", "weight": 10}
    finally:
        agent.terminate()
        agent.wait(30)
        link.close()
        server.stop()
