"""The whole cluster loop on loopback: the real operator and ``kubectl`` against the emulated cluster,
a real ``autoglm serve`` and a real ``autoglm agent`` for the target (the agent reports on its pod
through the API server, as in a cluster), the canary's figures from a real Prometheus scraping the
server under traffic. The test plays only what a cluster would: Argo (a Workflow ends with its
outputs, the artifact lies in the repository), KServe (a server started on the InferenceService's
``storageUri``) and the kubelet (the target's ConfigMap copied into the agent's mounted file).

``kubectl apply`` → Workflow → stable served → an edited spec → a new Workflow → the agent loads the
candidate at the first step's weight → Prometheus' figures pass the analysis → advanced → promoted:
the server serves the new revision, and the ledger holds each decision with its PromQL evidence.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import yaml

from autoglm_api.validation import load_manifest
from autoglm_core.variants import rollout_revision, target_revisions
from autoglm_inference.faults import ENABLE_ENV
from autoglm_inference.process import ServerProcess
from autoglm_operator.backends.local_serving import LocalServing
from autoglm_operator.plan import Serving
from tests.conftest import EXAMPLES
from tests.integration.test_operator import eventually, items, kubectl_json
from tests.support import playing
from tests.support.k8s_emulator import EmulatedCluster, emulated_cluster, kubectl_binary
from tests.support.operator import RunningOperator, settings_for
from tests.support.prometheus import prometheus
from tests.support.tiny_models import tiny_glm, with_model_card

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(kubectl_binary() is None, reason="kubectl is not installed"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

NS, NAME, TARGET = "ml", "support-glm", "local"
SERVED = f"{NAME}-{TARGET}"  # the InferenceService's name, which its server serves under
TOKEN = "s3cret"
ROLLOUT = {
    "strategy": "canary",
    "steps": [{"weight": 50, "pause": "2s"}, {"weight": 100}],
    "analysis": {"interval": "1s", "failureLimit": 2, "minRequests": 3, "maxErrorRate": 0.05,
                 "maxP95LatencyMs": 60_000, "maxJoulesPerToken": 2.0},
}  # fmt: skip


def _manifest(samples: int) -> dict[str, Any]:
    manifest = yaml.safe_load((EXAMPLES / "autoglm-model.yaml").read_text())
    manifest["spec"]["rollout"] = ROLLOUT
    manifest["spec"]["calibration"]["samples"] = samples  # another revision
    return manifest


class Node:
    """What KServe and the kubelet do for the target's one replica, on loopback."""

    def __init__(self, cluster: EmulatedCluster, root: Path, *, faults: Path) -> None:
        self.cluster, self.root, self.faults = cluster, root, faults
        self.config = root / "agent" / "desired.json"
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.server: ServerProcess | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, repository: Path) -> None:
        isvc = kubectl_json(self.cluster, "inferenceservice", SERVED, "-n", NS)
        model_uri = isvc["spec"]["predictor"]["model"]["storageUri"]
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(ENABLE_ENV, "1")  # the test's fault injection (refused without it)
            self.server = ServerProcess(
                SERVED, urlparse(model_uri).path, "--target", TARGET, "--test-faults", str(self.faults),
                log=self.root / "server.log",
                admin_token=TOKEN, model_roots=[repository, self.root / "cache"],
            ).wait_ready()  # fmt: skip
        labels = {
            "app.kubernetes.io/managed-by": "autoglm",
            "autoglm.io/model": NAME,
            "autoglm.io/target": TARGET,
        }
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"{SERVED}-predictor-0", "namespace": NS, "labels": labels},
               "spec": {"containers": [{"name": "kserve-container", "image": "autoglm:0.1.0"}]},
               "status": {"phase": "Running"}}  # fmt: skip
        done = self.cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(pod))
        assert done.returncode == 0, done.stderr
        self._sync()
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig), "POD_NAME": pod["metadata"]["name"],
               "POD_NAMESPACE": NS, "AUTOGLM_ADMIN_TOKEN": TOKEN}  # fmt: skip
        with (self.root / "agent.log").open("wb") as log:
            self.agent = subprocess.Popen(
                [sys.executable, "-m", "autoglm_operator", "agent", "--config", str(self.config),
                 "--server", self.server.url, "--cache-dir", str(self.root / "cache"), "--interval", "0.5"],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        for work in (self._kubelet, self._traffic):
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _sync(self) -> None:
        found = kubectl_json(self.cluster, "configmap", f"{SERVED}-autoglm", "-n", NS)
        text = found["data"]["desired.json"] if found else None
        if text and (not self.config.is_file() or self.config.read_text() != text):
            partial = self.config.with_suffix(".tmp")
            partial.write_text(text)
            partial.replace(self.config)  # as the kubelet swaps a ConfigMap volume: atomically

    def _kubelet(self) -> None:
        while not self._stop.wait(0.5):
            self._sync()

    def _traffic(self) -> None:
        while not self._stop.wait(0.1):
            assert self.server is not None
            body = {"model": SERVED, "prompt": "To be, or not to be", "max_tokens": 4}
            with contextlib.suppress(httpx.HTTPError):  # a swap in between: the next one
                httpx.post(f"{self.server.url}/openai/v1/completions", json=body, timeout=30)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        if self.agent is not None:
            self.agent.terminate()
            self.agent.wait(30)
        if self.server is not None:
            self.server.stop()


def _succeed(cluster: EmulatedCluster, repository: Path, revision: str, seed: int) -> str:
    """Play Argo for ``revision``'s run: the published model lies in the repository under the output
    artifact's key; the Workflow ends with the outputs the template exports. The variant's revision."""
    run = eventually(
        lambda: [r for r in items(cluster, "workflows", f"autoglm.io/model={NAME}")
                 if r["metadata"]["labels"]["autoglm.io/revision"] == revision],
        f"the Workflow of {revision}",
    )[0]  # fmt: skip
    manifest = next(p["value"] for p in run["spec"]["arguments"]["parameters"] if p["name"] == "manifest")
    path = repository / "manifests" / f"{revision}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(manifest)
    variant = target_revisions(load_manifest(str(path)).spec)[TARGET]
    key = f"{NS}/{run['metadata']['name']}/publish"
    folder = tiny_glm(repository / key / "model", seed=seed)
    with_model_card(folder, variant)
    publish = {"step": "publish", "status": "Succeeded",
               "metrics": {"artifact": "/autoglm/work/publish/model", "revision": variant, "artifactBytes": 10**6}}  # fmt: skip
    status = {"phase": "Succeeded", "outputs": {
        "parameters": [{"name": "validate-result", "value": json.dumps({"passed": True, "gates": []})},
                       {"name": "publish-result", "value": json.dumps(publish)}],
        "artifacts": [{"name": "published-model", "s3": {"key": key}}]}}  # fmt: skip
    done = cluster.kubectl("patch", "workflow", run["metadata"]["name"], "-n", NS, "--type", "merge",
                           "-p", json.dumps({"status": status}))  # fmt: skip
    assert done.returncode == 0, done.stderr
    return variant


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmulatedCluster]:
    with emulated_cluster(tmp_path / "cluster") as running:
        done = running.kubectl(
            "apply", "-f", "-", stdin="apiVersion: v1\nkind: Namespace\nmetadata: {name: ml}\n"
        )
        assert done.returncode == 0, done.stderr
        yield running


def _status(cluster: EmulatedCluster) -> dict[str, Any]:
    return dict((kubectl_json(cluster, "agm", NAME, "-n", NS) or {}).get("status") or {})


def _canary(
    cluster: EmulatedCluster, root: Path, *, fault: dict[str, float] | None = None
) -> tuple[list[dict[str, Any]], str, str, str, Serving]:
    """A first rollout, then a canary of a second revision (its variant faulty with ``fault``) until
    the model's status says it was promoted or rejected. The ledger's records, the Prometheus URL,
    the stable and candidate variants, and what the server serves at the end."""
    repository = root / "repository"
    targets, faults = root / "prometheus-targets.json", root / "faults.json"
    targets.write_text("[]")
    faults.write_text("{}")
    node = Node(cluster, root / "node", faults=faults)
    audit = settings_for(root)
    with prometheus(root / "prometheus", targets) as prom:
        options = {"prometheus_url": prom.url, "artifact_repository": repository.as_uri()}
        with RunningOperator(cluster, audit, options=options):
            try:
                first = _manifest(128)
                done = cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(first))
                assert done.returncode == 0, done.stderr
                stable = _succeed(cluster, repository, rollout_revision(playing.model_of(first).spec), seed=1)
                eventually(
                    lambda: kubectl_json(cluster, "inferenceservice", SERVED, "-n", NS),
                    "the InferenceService",
                )
                node.start(repository)
                assert node.server is not None
                # No relabelling: the server's own model, revision and target labels select it.
                targets.write_text(json.dumps([{"targets": [urlparse(node.server.url).netloc]}]))
                eventually(
                    lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in _status(cluster).get("conditions", [])),
                    "the agent's report: Ready", timeout=60,
                )  # fmt: skip

                second = _manifest(64)
                revision = rollout_revision(playing.model_of(second).spec)
                done = cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(second))
                assert done.returncode == 0, done.stderr
                variant = target_revisions(playing.model_of(second).spec)[TARGET]
                # The candidate has the same weights as stable: with no fault, stable is slowed so the
                # candidate is never judged worse by chance (that race is the judge's tests' business).
                slowed = {variant: fault} if fault else {stable: {"latencyFactor": 2.0}}
                faults.write_text(json.dumps({"revisions": slowed}))
                candidate = _succeed(cluster, repository, revision, seed=1)  # the same weights: judged alike
                assert candidate == variant
                backend = LocalServing(SERVED, node.server.url, headers=node.server.admin_headers)
                eventually(
                    lambda: backend.observe().canary == candidate,
                    "the agent loading the candidate",
                    timeout=60,
                )
                revisions = lambda: _status(cluster).get("revisions", {})  # noqa: E731
                try:
                    eventually(lambda: revision in (revisions().get("stable"), revisions().get("rejected")),
                               "the canary's end", timeout=120)  # fmt: skip
                except BaseException:
                    print("status:", json.dumps(_status(cluster), indent=1))
                    print("ledger:", _audit(audit))
                    print("agent log:", (root / "node" / "agent.log").read_text()[-3000:])
                    raise
                wanted = (
                    Serving(stable=candidate)
                    if revisions().get("stable") == revision
                    else Serving(stable=stable)
                )
                served = eventually(
                    lambda: backend.observe() == wanted and wanted, "the agent's last swap", timeout=60
                )
            finally:
                node.stop()
        return json.loads(_audit(audit)), prom.url, stable, candidate, served


def test_a_canary_promoted_on_prometheus_figures_through_real_agents(
    cluster: EmulatedCluster, tmp_path: Path
) -> None:
    records, prom, stable, candidate, served = _canary(cluster, tmp_path)
    kinds = [r["decision"] for r in records]
    failed = [r["reason"] for r in records if r["decision"] == "CanaryIntervalFailed"]
    assert served == Serving(stable=candidate), (kinds, failed)
    assert kinds[:2] == ["PipelineStarted", "Promoted"]
    assert kinds[2:] == ["PipelineStarted", "CanaryStarted", "CanaryAdvanced", "Promoted"], (kinds, failed)
    advanced = records[4]["evidence"]["analysis"]
    assert advanced["outcome"] == "Successful"
    assert advanced["source"] == f"PromQL against {prom}"
    assert any(f'target="{TARGET}"' in q for q in advanced["queries"])
    assert advanced["candidateFigures"]["requests"] >= 3
    assert stable != candidate


def test_a_failing_candidate_is_rolled_back_and_stable_keeps_serving(
    cluster: EmulatedCluster, tmp_path: Path
) -> None:
    records, _, stable, _, served = _canary(cluster, tmp_path, fault={"errorRate": 0.5})
    assert served == Serving(stable=stable)  # the agent unloaded the candidate
    kinds = [r["decision"] for r in records]
    assert kinds[2:] == [
        "PipelineStarted",
        "CanaryStarted",
        "CanaryIntervalFailed",
        "CanaryIntervalFailed",
        "RolledBack",
    ]
    rollback = records[-1]["evidence"]["analysis"]
    assert rollback["outcome"] == "Failed"
    errors = next(c for c in rollback["checks"] if c["metric"] == "errorRate")
    assert errors["passed"] is False


def _audit(audit: str) -> str:
    """``autoglm audit query`` of the model, as a person runs it."""
    command = [
        sys.executable,
        "-m",
        "autoglm_operator",
        "audit",
        "--db",
        audit,
        "query",
        "--model",
        f"{NS}/{NAME}",
        "-o",
        "json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout
