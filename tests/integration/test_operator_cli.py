"""``autoglm operator`` as a user starts it: a process, with ``--kubeconfig`` and ``--namespace``; it
acts on the models of its namespace only and stops cleanly on SIGTERM (what a pod's shutdown sends)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLES
from tests.support.k8s_emulator import EmulatedCluster, emulated_cluster, kubectl_binary

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(kubectl_binary() is None, reason="kubectl is not installed"),
]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmulatedCluster]:
    with emulated_cluster(tmp_path / "cluster") as running:
        for namespace in ("ml", "other"):
            done = running.kubectl(
                "apply",
                "-f",
                "-",
                stdin=f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}}}\n",
            )
            assert done.returncode == 0, done.stderr
        yield running


def _workflows(cluster: EmulatedCluster, namespace: str) -> list[str]:
    done = cluster.kubectl("get", "workflows", "-n", namespace, "-o", "json")
    assert done.returncode == 0, done.stderr
    return [w["metadata"]["name"] for w in json.loads(done.stdout)["items"]]


def test_the_operator_command_acts_in_its_namespace_only_and_stops_on_sigterm(
    cluster: EmulatedCluster, tmp_path: Path
) -> None:
    manifest = yaml.safe_load((EXAMPLES / "autoglm-model.yaml").read_text())
    elsewhere = {**manifest, "metadata": {**manifest["metadata"], "namespace": "other"}}
    for document in (manifest, elsewhere):
        done = cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(document))
        assert done.returncode == 0, done.stderr
    log = tmp_path / "operator.log"
    command = [sys.executable, "-m", "autoglm_operator", "operator", "--kubeconfig", str(cluster.kubeconfig),
               "--namespace", "ml", "--standalone", "--interval", "1",
               "--audit-url", f"sqlite:///{tmp_path / 'audit.db'}"]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _workflows(cluster, "ml"):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no Workflow in ml:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
        time.sleep(2)
        assert _workflows(cluster, "other") == []  # not its namespace
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
