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
