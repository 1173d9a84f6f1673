"""The chart's RBAC against what the operator really calls.

``autoglm operator`` runs as the chart runs it (a process, every namespace, kopf's peering, its own
credentials) against the emulated cluster, through the paths that reach every kind of call: a model
applied, built, served, canaried, promoted by a person's intent, rolled back by another, edited, and
deleted with everything it owned. The emulator records each call by the caller's token as RBAC sees
it (verb, API group, resource); the chart's ClusterRole must allow every call the operator made, and
every rule it grants must have been used, so a missing rule or a needless one fails here.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_operator import (
    NAME,
    NS,
    _annotate,
    _edited,
    _in_canary,
    _serving,
    apply,
    desired,
    eventually,
    follow,
    items,
    kubectl_json,
    model_status,
    report,
)
from tests.support.k8s_emulator import EmulatedCluster, emulated_cluster_with, kubectl_binary, namespace

helm = pytest.importorskip("helm_python")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(kubectl_binary() is None, reason="kubectl is not installed"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

CHART = Path(__file__).resolve().parents[2] / "charts" / "autoglm"
TOKEN = "system-serviceaccount-autoglm-operator"


def granted(values: dict[str, Any] | None = None) -> set[tuple[str, str, str]]:
    """Every (verb, group, resource) the chart grants the operator: its ClusterRole, and its Role in
    each watched namespace (the pipeline's own Role is not the operator's)."""
    manifests = helm.Chart.load(str(CHART)).render(values or {}, name="autoglm", namespace="autoglm-system")
    roles = [
        doc
        for text in manifests.values()
        for doc in yaml.safe_load_all(text)
        if doc and doc["kind"] in ("ClusterRole", "Role") and doc["metadata"]["name"] == "autoglm-operator"
    ]
    return {
        (verb, group, resource)
        for role in roles
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmulatedCluster]:
    # What the chart creates beside the operator: the peering object its replicas elect one through
    # (cluster-wide, or one in each watched namespace).
    peerings = (
        "apiVersion: kopf.dev/v1\nkind: ClusterKopfPeering\nmetadata: {name: autoglm}\n",
        f"apiVersion: kopf.dev/v1\nkind: KopfPeering\nmetadata: {{name: autoglm, namespace: {NS}}}\n",
    )
    with emulated_cluster_with(tmp_path / "cluster", namespace(NS), *peerings) as running:
        yield running


@pytest.mark.parametrize(
    ("scope", "values"),
    [(["--all-namespaces"], {}), (["--namespace=ml"], {"operator": {"watchNamespaces": ["ml"]}})],
    ids=["every namespace: a ClusterRole", "one namespace: a Role there"],
)
def test_the_chart_grants_every_call_the_operator_makes_and_nothing_else(
    cluster: EmulatedCluster, tmp_path: Path, scope: list[str], values: dict[str, Any]
) -> None:
    audit = f"sqlite:///{tmp_path / 'audit.db'}"
    kubeconfig = cluster.kubeconfig_for(TOKEN)
    log = tmp_path / "operator.log"
    # The chart's Deployment's command, less what has no API call (liveness, metrics, the image).
    command = [sys.executable, "-m", "autoglm_operator", "operator", "--kubeconfig", str(kubeconfig),
               *scope, "--peering=autoglm", "--priority=100", "--interval=1",
               "--audit-url", audit]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        stable = _serving(cluster, audit)
        first, variants_of = _in_canary(cluster, _edited(groupSize=64))
        for target, revision in variants_of.items():
            report(cluster, target, 0, {"stable": desired(cluster, target)["stable"]["revision"],
                                        "canary": revision, "weight": 10})  # fmt: skip
        _annotate(cluster, "autoglm.io/promote=alice")
        eventually(lambda: model_status(cluster).get("revisions", {}).get("stable") == first, "the promotion")
        follow(cluster)
        second, _ = _in_canary(cluster, _edited(groupSize=32))
        _annotate(cluster, "autoglm.io/abort=bob")
        eventually(
            lambda: model_status(cluster).get("revisions", {}).get("rejected") == second, "the rollback"
        )
        assert stable != first
        # A new replica range: the InferenceService is patched to it (no new revision, no pipeline).
        scaled = _edited(groupSize=64)
        scaled["spec"]["targets"][0]["replicas"] = {"min": 1, "max": 7}
        apply(cluster, scaled)
        eventually(
            lambda: any(
                i["spec"]["predictor"].get("maxReplicas") == 7 for i in items(cluster, "inferenceservices")
            ),
            "the InferenceService's new replica range",
        )
        done = cluster.kubectl("delete", "agm", NAME, "-n", NS, "--timeout=60s")
        assert done.returncode == 0, done.stderr
        for resource in ("inferenceservices", "configmaps", "workflows", "workflowtemplates"):
            assert items(cluster, resource) == [], resource
        assert kubectl_json(cluster, "agm", NAME, "-n", NS) is None
        time.sleep(1)  # a last timer tick and the peering's keep-alive
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert cluster.emulator is not None
    made = cluster.emulator.calls[TOKEN]
    assert made, f"no call recorded for the operator:\n{log.read_text()[-3000:]}"
    called = {(verb, group, resource) for verb, group, resource, _ in made}
    allowed = granted(values)
    assert not called - allowed, f"calls no rule allows: {sorted(called - allowed)}"
    assert not allowed - called, f"rules no call used: {sorted(allowed - called)}"
