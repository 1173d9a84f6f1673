"""GitOps: the Argo CD Application and the Flux Kustomization of ``examples/gitops`` are valid for
their upstream CRDs and point at a folder kustomize builds into valid AutoGLMModels; and a whole
rollout under the real operator leaves nothing a sync tool would report as drift. The models are
applied from git as Argo CD and Flux apply them (``kubectl apply -k``), the rollout runs (build,
serve, a git edit canaried, a person's promote intent), and after each step every field git holds
is what the cluster holds: no spec or label written by the operator. The intent is an annotation
git does not hold; the operator records it in the ledger and removes it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoglm_api.validation import prune_nulls
from tests.integration.test_operator import (
    NAME,
    NS,
    _annotate,
    decisions,
    desired,
    eventually,
    follow,
    items,
    kubectl_json,
    model_status,
    report,
    succeed,
)
from tests.support import crd_schemas
from tests.support.k8s_emulator import EmulatedCluster, emulated_cluster_with, kubectl_binary, namespace
from tests.support.operator import RunningOperator, settings_for

REPO = Path(__file__).resolve().parents[2]
GITOPS = REPO / "examples" / "gitops"

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
needs_kubectl = pytest.mark.skipif(kubectl_binary() is None, reason="kubectl is not installed")


@pytest.mark.parametrize("name", ["argocd-application.yaml", "flux-kustomization.yaml"])
def test_the_sync_objects_are_valid_for_their_crds(name: str) -> None:
    obj = yaml.safe_load((GITOPS / name).read_text())
    assert not crd_schemas.problems(obj), crd_schemas.problems(obj)
    path = obj["spec"]["source"]["path"] if obj["kind"] == "Application" else obj["spec"]["path"]
    assert (REPO / path / "kustomization.yaml").is_file(), path


def test_the_models_in_git_are_the_examples() -> None:
    assert (GITOPS / "models" / "glm4-chat.yaml").read_text() == (
        REPO / "examples" / "cloud-and-edge.yaml"
    ).read_text()


def _build(folder: Path, cluster: EmulatedCluster) -> list[dict[str, Any]]:
    """What a sync tool applies: ``kubectl kustomize`` of the folder."""
    done = cluster.kubectl("kustomize", str(folder))
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def drift(desired_obj: Any, live: Any, path: str = "") -> list[str]:
    """Every field git holds that the cluster holds differently (what Argo CD and Flux diff)."""
    if isinstance(desired_obj, dict) and isinstance(live, dict):
        return [p for key, value in desired_obj.items() for p in drift(value, live.get(key), f"{path}.{key}")]
    return [] if desired_obj == live else [path or "$"]


def test_drift_names_each_field_git_holds_differently() -> None:
    git = {"metadata": {"labels": {"team": "a"}}, "spec": {"x": 1, "y": [1, 2]}}
    assert (
        drift(git, {"metadata": {"labels": {"team": "a"}, "uid": "u"}, "spec": {"x": 1, "y": [1, 2], "z": 3}})
        == []
    )
    assert drift(git, {"metadata": {"labels": {"team": "b"}}, "spec": {"x": 2, "y": [1]}}) == [
        ".metadata.labels.team",
        ".spec.x",
        ".spec.y",
    ]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmulatedCluster]:
    with emulated_cluster_with(tmp_path / "cluster", namespace(NS)) as running:
        yield running


@needs_kubectl
def test_a_rollout_leaves_no_drift_from_git(cluster: EmulatedCluster, tmp_path: Path) -> None:
    repo = tmp_path / "git"
    shutil.copytree(GITOPS / "models", repo)

    def sync() -> list[dict[str, Any]]:
        done = cluster.kubectl("apply", "-k", str(repo))
        assert done.returncode == 0, done.stderr
        return _build(repo, cluster)

    def in_sync(wanted: list[dict[str, Any]]) -> None:
        for obj in map(prune_nulls, wanted):  # a null field is an unset one, to kubectl and the API server
            live = kubectl_json(cluster, "agm", obj["metadata"]["name"], "-n", NS)
            assert live is not None
            assert drift(obj, live) == [], f"drift from git: {drift(obj, live)}"
            assert live["spec"] == obj["spec"]  # not a field more
            assert live["metadata"].get("labels") == obj["metadata"].get("labels")

    with RunningOperator(cluster, settings_for(tmp_path)) as operator:
        wanted = sync()
        run = eventually(lambda: items(cluster, "workflows"), "the first Workflow")[0]
        succeed(cluster, run)
        eventually(lambda: model_status(cluster).get("phase") == "Serving", "Serving")
        follow(cluster)
        in_sync(wanted)

        # A commit: another compression for the edge target, synced; its canary starts.
        manifest = yaml.safe_load((repo / "glm4-chat.yaml").read_text())
        manifest["spec"]["compression"]["quantization"]["groupSize"] = 64
        (repo / "glm4-chat.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
        wanted = sync()
        runs = eventually(lambda: [r for r in items(cluster, "workflows") if r["metadata"]["name"] != run["metadata"]["name"]],
                          "the edit's Workflow")  # fmt: skip
        succeed(cluster, runs[0])
        candidate = eventually(lambda: (desired(cluster, "edge") or {}).get("candidate"), "the edge canary")
        report(cluster, "edge", 0, {"stable": desired(cluster, "edge")["stable"]["revision"],
                                    "canary": candidate["revision"], "weight": candidate["weight"]})  # fmt: skip
        in_sync(wanted)

        # A person promotes it: an annotation git does not hold, handled, recorded, removed.
        _annotate(cluster, "autoglm.io/promote=alice")
        eventually(lambda: model_status(cluster).get("phase") == "Serving"
                   and not model_status(cluster).get("revisions", {}).get("candidate"), "the promotion")  # fmt: skip
        annotations = kubectl_json(cluster, "agm", NAME, "-n", NS)["metadata"].get("annotations", {})
        assert "autoglm.io/promote" not in annotations
        assert any(
            kind == "ManualOverride" and actor == "user:alice"
            for kind, _, actor in decisions(operator.audit_url)
        )
        follow(cluster)
        in_sync(wanted)
        # A sync after all of it has nothing to change.
        done = cluster.kubectl("apply", "-k", str(repo))
        assert done.returncode == 0, done.stderr
        assert "unchanged" in done.stdout, done.stdout
