"""The whole cluster loop on loopback: the real operator and ``kubectl`` against the emulated cluster,
a real ``autoglm serve`` and a real ``autoglm agent`` for the target (the agent reports on its pod
through the API server, as in a cluster), the canary's figures from a real Prometheus scraping the
server under traffic. The test plays only what a cluster would: Argo (a Workflow ends with its
outputs, the artifact lies in the repository), KServe (a server started on the InferenceService's
``storageUri``) and the kubelet (the target's ConfigMap copied into the agent's mounted file).

``kubectl apply`` of each example (one CPU target; a cloud GPU target and a KubeEdge target, a
server and an agent each) → Workflow → stable served → an edited spec → a new Workflow → every
agent loads its target's candidate at the first step's weight → Prometheus' figures pass the
analysis on every target → advanced → promoted: each server serves its new variant, and the ledger
holds each decision with its PromQL evidence. A candidate failing on live traffic is rolled back.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import yaml

from autoglm_core.variants import rollout_revision, target_revisions, variants
from autoglm_inference.faults import ENABLE_ENV
from autoglm_inference.process import ServerProcess
from autoglm_operator.backends.local_serving import LocalServing
from autoglm_operator.plan import Serving
from autoglm_pipelines.dag import step_name
from autoglm_pipelines.workflow import published_artifact, result_parameter
from tests.conftest import EXAMPLES
from tests.integration.test_operator import eventually, items, kubectl_json
from tests.support import playing
from tests.support.k8s_emulator import EmulatedCluster, emulated_cluster_with, kubectl_binary, namespace
from tests.support.loop import promoted_kinds
from tests.support.operator import RunningOperator, settings_for
from tests.support.prometheus import prometheus
from tests.support.tiny_models import tiny_glm, with_model_card

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(kubectl_binary() is None, reason="kubectl is not installed"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

NS = "ml"
TOKEN = "s3cret"
#: Each example: its model's name and targets.
EXAMPLE_MODELS = {
    "autoglm-model": ("support-glm", ("local",)),
    "cloud-and-edge": ("glm4-chat", ("cloud", "edge")),
}
ROLLOUT = {
    "strategy": "canary",
    "steps": [{"weight": 50, "pause": "2s"}, {"weight": 100}],
    "analysis": {"interval": "1s", "failureLimit": 2, "minRequests": 3, "maxErrorRate": 0.05,
                 "maxP95LatencyMs": 60_000, "maxJoulesPerToken": 2.0},
}  # fmt: skip


def _manifest(example: str, samples: int) -> dict[str, Any]:
    manifest = yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())
    manifest["spec"]["rollout"] = ROLLOUT
    manifest["spec"]["calibration"]["samples"] = samples  # another revision of every target
    return manifest


class Node:
    """What KServe and the kubelet do for one target's one replica, on loopback."""

    def __init__(
        self, cluster: EmulatedCluster, root: Path, model: str, target: str, *, faults: Path
    ) -> None:
        self.cluster, self.root, self.faults = cluster, root, faults
        self.model, self.target = model, target
        self.served = f"{model}-{target}"  # the InferenceService's name, which its server serves under
        self.config = root / "agent" / "desired.json"
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.server: ServerProcess | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, repository: Path) -> None:
        isvc = kubectl_json(self.cluster, "inferenceservice", self.served, "-n", NS)
        model_uri = isvc["spec"]["predictor"]["model"]["storageUri"]
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(ENABLE_ENV, "1")  # the test's fault injection (refused without it)
            self.server = ServerProcess(
                self.served, urlparse(model_uri).path, "--target", self.target, "--test-faults", str(self.faults),
                log=self.root / "server.log",
                admin_token=TOKEN, model_roots=[repository, self.root / "cache"],
            ).wait_ready()  # fmt: skip
        labels = {
            "app.kubernetes.io/managed-by": "autoglm",
            "autoglm.io/model": self.model,
            "autoglm.io/target": self.target,
        }
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"{self.served}-predictor-0", "namespace": NS, "labels": labels},
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
        found = kubectl_json(self.cluster, "configmap", f"{self.served}-autoglm", "-n", NS)
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
            body = {"model": self.served, "prompt": "To be, or not to be", "max_tokens": 4}
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


def _succeed(cluster: EmulatedCluster, repository: Path, model: str, revision: str) -> dict[str, str]:
    """Play Argo for ``revision``'s run: each variant's published model lies in the repository under
    its output artifact's key; the Workflow ends with the outputs the template exports. Each target's
    variant revision."""
    run = eventually(
        lambda: [r for r in items(cluster, "workflows", f"autoglm.io/model={model}")
                 if r["metadata"]["labels"]["autoglm.io/revision"] == revision],
        f"the Workflow of {revision}",
    )[0]  # fmt: skip
    built = playing.run_manifest(run)
    parameters, artifacts = [], []
    for variant in variants(built.spec):
        step = step_name("publish", variant.name)
        key = f"{NS}/{run['metadata']['name']}/{step}"
        folder = tiny_glm(repository / key / "model", seed=1)  # the same weights every time: judged alike
        with_model_card(folder, variant.revision)
        publish = {"step": step, "status": "Succeeded",
                   "metrics": {"artifact": f"/autoglm/work/{step}/model", "revision": variant.revision,
                               "artifactBytes": 10**6}}  # fmt: skip
        parameters += [
            {
                "name": result_parameter(step_name("validate", variant.name)),
                "value": json.dumps({"passed": True}),
            },
            {"name": result_parameter(step), "value": json.dumps(publish)},
        ]
        artifacts.append({"name": published_artifact(variant.name), "s3": {"key": key}})
    status = {"phase": "Succeeded", "outputs": {"parameters": parameters, "artifacts": artifacts}}
    done = cluster.kubectl("patch", "workflow", run["metadata"]["name"], "-n", NS, "--type", "merge",
                           "-p", json.dumps({"status": status}))  # fmt: skip
    assert done.returncode == 0, done.stderr
    return target_revisions(built.spec)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmulatedCluster]:
    with emulated_cluster_with(tmp_path / "cluster", namespace(NS)) as running:
        yield running


@dataclass
class Outcome:
    records: list[dict[str, Any]]
    prometheus: str
    stable: dict[str, str]
    candidate: dict[str, str]
    served: dict[str, Serving]


def _canary(
    cluster: EmulatedCluster, root: Path, example: str, *, fault: dict[str, float] | None = None
) -> Outcome:
    """A first rollout of ``example``, then a canary of a second revision (each target's variant
    faulty with ``fault``) until the model's status says it was promoted or rejected."""
    model, targets = EXAMPLE_MODELS[example]
    repository = root / "repository"
    scrape, faults = root / "prometheus-targets.json", root / "faults.json"
    scrape.write_text("[]")
    faults.write_text("{}")
    nodes = {t: Node(cluster, root / t, model, t, faults=faults) for t in targets}
    audit = settings_for(root)

    def status() -> dict[str, Any]:
        return dict((kubectl_json(cluster, "agm", model, "-n", NS) or {}).get("status") or {})

    with prometheus(root / "prometheus", scrape) as prom:
        options = {"prometheus_url": prom.url, "artifact_repository": repository.as_uri()}
        with RunningOperator(cluster, audit, options=options):
            try:
                first = _manifest(example, 128)
                done = cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(first))
                assert done.returncode == 0, done.stderr
                stable = _succeed(cluster, repository, model, rollout_revision(playing.model_of(first).spec))
                for node in nodes.values():
                    eventually(lambda n=node: kubectl_json(cluster, "inferenceservice", n.served, "-n", NS),
                               f"{node.served}")  # fmt: skip
                    node.start(repository)
                # No relabelling: the servers' own model, revision and target labels select them.
                servers = [urlparse(n.server.url).netloc for n in nodes.values() if n.server is not None]
                scrape.write_text(json.dumps([{"targets": servers}]))
                eventually(
                    lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in status().get("conditions", [])),
                    "every target's agent reporting: Ready", timeout=90,
                )  # fmt: skip

                second = _manifest(example, 64)
                revision = rollout_revision(playing.model_of(second).spec)
                wanted = target_revisions(playing.model_of(second).spec)
                # With no fault, stable is slowed so that identical weights are never judged worse by
                # chance (that race is the judge's tests' business).
                slowed = (
                    {wanted[t]: fault for t in targets}
                    if fault
                    else {stable[t]: {"latencyFactor": 2.0} for t in targets}
                )
                faults.write_text(json.dumps({"revisions": slowed}))
                done = cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(second))
                assert done.returncode == 0, done.stderr
                candidate = _succeed(cluster, repository, model, revision)
                assert candidate == wanted
                backends = {
                    t: LocalServing(n.served, n.server.url, headers=n.server.admin_headers)
                    for t, n in nodes.items() if n.server is not None
                }  # fmt: skip
                for t, backend in backends.items():
                    eventually(lambda b=backend, t=t: b.observe().canary == candidate[t], f"{t}'s agent loading the candidate", timeout=90)  # fmt: skip
                revisions = lambda: status().get("revisions", {})  # noqa: E731
                try:
                    eventually(lambda: revision in (revisions().get("stable"), revisions().get("rejected")),
                               "the canary's end", timeout=150)  # fmt: skip
                except BaseException:
                    print("status:", json.dumps(status(), indent=1))
                    print("ledger:", _audit(audit, model))
                    raise
                promoted = revisions().get("stable") == revision
                served = {}
                for t, backend in backends.items():
                    end = Serving(stable=candidate[t] if promoted else stable[t])
                    served[t] = eventually(lambda b=backend, e=end: b.observe() == e and e, f"{t}'s last swap", timeout=60)  # fmt: skip
            finally:
                for node in nodes.values():
                    node.stop()
        return Outcome(json.loads(_audit(audit, model)), prom.url, stable, candidate, served)


@pytest.mark.parametrize(
    "example",
    # Both examples in make test-e2e; the two-target one (a minute on 2 cores) there only.
    [
        pytest.param(e, marks=pytest.mark.e2e) if len(EXAMPLE_MODELS[e][1]) > 1 else e
        for e in sorted(EXAMPLE_MODELS)
    ],
)
def test_a_canary_promoted_on_prometheus_figures_through_real_agents(
    cluster: EmulatedCluster, tmp_path: Path, example: str
) -> None:
    outcome = _canary(cluster, tmp_path, example)
    failed = [r["reason"] for r in outcome.records if r["decision"] == "CanaryIntervalFailed"]
    kinds = promoted_kinds([r["decision"] for r in outcome.records], ROLLOUT["analysis"]["failureLimit"])
    assert outcome.served == {t: Serving(stable=c) for t, c in outcome.candidate.items()}, (kinds, failed)
    assert kinds == [
        "PipelineStarted",
        "Promoted",
        "PipelineStarted",
        "CanaryStarted",
        "CanaryAdvanced",
        "Promoted",
    ], (kinds, failed)
    advanced = next(r for r in outcome.records if r["decision"] == "CanaryAdvanced")
    evidence = advanced["evidence"]
    judged = evidence.get("analyses") or {evidence["analysis"]["target"]: evidence["analysis"]}
    assert set(judged) == set(outcome.candidate)  # every target judged, each on its own figures
    for target, analysis in judged.items():
        assert analysis["outcome"] == "Successful"
        assert analysis["source"] == f"PromQL against {outcome.prometheus}"
        assert any(f'target="{target}"' in q for q in analysis["queries"])
        assert analysis["candidateFigures"]["requests"] >= 3
    assert all(outcome.stable[t] != outcome.candidate[t] for t in outcome.stable)


def test_a_failing_candidate_is_rolled_back_and_stable_keeps_serving(
    cluster: EmulatedCluster, tmp_path: Path
) -> None:
    outcome = _canary(cluster, tmp_path, "autoglm-model", fault={"errorRate": 0.5})
    assert outcome.served == {
        t: Serving(stable=s) for t, s in outcome.stable.items()
    }  # the candidate unloaded
    kinds = [r["decision"] for r in outcome.records]
    # An interval of a few requests may see none of the candidate's errors (3 requests at a 50% error
    # rate: one time in eight), so a step may advance before the failures that roll it back (a full
    # run once did); it is never promoted.
    assert [k for k in kinds[2:] if k != "CanaryAdvanced"] == [
        "PipelineStarted",
        "CanaryStarted",
        "CanaryIntervalFailed",
        "CanaryIntervalFailed",
        "RolledBack",
    ], kinds
    rollback = outcome.records[-1]["evidence"]["analysis"]
    assert rollback["outcome"] == "Failed"
    errors = next(c for c in rollback["checks"] if c["metric"] == "errorRate")
    assert errors["passed"] is False


def _audit(audit: str, model: str) -> str:
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
        f"{NS}/{model}",
        "-o",
        "json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout
