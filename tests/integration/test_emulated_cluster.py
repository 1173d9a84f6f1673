"""The emulated cluster the operator's tests run against answers the real ``kubectl`` as an API server
would: apply, get, edit and delete of AutoGLMModels, and of every object the operator creates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoglm_api.validation import prune_nulls
from tests.conftest import EXAMPLES
from tests.support.k8s_emulator import EmulatedCluster, emulated_cluster, kubectl_binary, merge_patch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(kubectl_binary() is None, reason="kubectl is not installed"),
]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmulatedCluster]:
    with emulated_cluster(tmp_path) as running:
        namespace = "apiVersion: v1\nkind: Namespace\nmetadata: {name: ml}\n"
        done = running.kubectl("apply", "-f", "-", stdin=namespace)
        assert done.returncode == 0, done.stderr
        yield running


def _get(cluster: EmulatedCluster, *args: str) -> dict[str, Any]:
    done = cluster.kubectl("get", *args, "-o", "json")
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def test_kubectl_apply_creates_a_model_with_server_set_metadata(cluster: EmulatedCluster) -> None:
    done = cluster.kubectl("apply", "-f", str(EXAMPLES / "cloud-and-edge.yaml"))
    assert done.returncode == 0, done.stderr
    assert "autoglmmodel.autoglm.io/glm4-chat created" in done.stdout
    assert done.stderr == ""  # no version skew, no short-name or validation warnings
    model = _get(cluster, "agm", "glm4-chat", "-n", "ml")
    manifest = yaml.safe_load((EXAMPLES / "cloud-and-edge.yaml").read_text())
    assert model["spec"] == prune_nulls(manifest["spec"])  # kubectl drops a manifest's nulls
    meta = model["metadata"]
    assert meta["generation"] == 1
    assert meta["uid"]
    assert int(meta["resourceVersion"]) > 0
    assert meta["creationTimestamp"].endswith("Z")
    listed = _get(cluster, "agm", "-n", "ml")
    assert listed["kind"] == "List"  # kubectl wraps what the server's AutoGLMModelList held
    assert [item["metadata"]["name"] for item in listed["items"]] == ["glm4-chat"]


def test_an_edited_spec_is_a_new_generation_and_metadata_alone_is_not(
    cluster: EmulatedCluster, tmp_path: Path
) -> None:
    manifest = yaml.safe_load((EXAMPLES / "cloud-and-edge.yaml").read_text())
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert cluster.kubectl("apply", "-f", str(path)).returncode == 0
    first = _get(cluster, "agm", "glm4-chat", "-n", "ml")["metadata"]
    manifest["metadata"]["labels"] = {"team": "search"}
    path.write_text(yaml.safe_dump(manifest))
    assert cluster.kubectl("apply", "-f", str(path)).returncode == 0
    labelled = _get(cluster, "agm", "glm4-chat", "-n", "ml")["metadata"]
    assert labelled["generation"] == 1
    assert labelled["labels"] == {"team": "search"}
    assert int(labelled["resourceVersion"]) > int(first["resourceVersion"])
    manifest["spec"]["rollout"]["steps"] = [{"weight": 25, "pause": "1m"}, {"weight": 100}]
    path.write_text(yaml.safe_dump(manifest))
    done = cluster.kubectl("apply", "-f", str(path))
    assert done.returncode == 0, done.stderr
    edited = _get(cluster, "agm", "glm4-chat", "-n", "ml")
    assert edited["metadata"]["generation"] == 2
    assert edited["spec"]["rollout"]["steps"] == [{"weight": 25, "pause": "1m"}, {"weight": 100}]
    assert edited["metadata"]["uid"] == first["uid"]


def test_every_object_the_operator_creates_is_accepted_by_kubectl(cluster: EmulatedCluster) -> None:
    rendered = EXAMPLES / "rendered" / "cloud-and-edge.objects.yaml"
    done = cluster.kubectl("apply", "-f", str(rendered))
    assert done.returncode == 0, done.stderr
    objects = [o for o in yaml.safe_load_all(rendered.read_text()) if o]
    assert len(done.stdout.strip().splitlines()) == len(objects)
    services = _get(cluster, "inferenceservices", "-n", "ml")
    assert sorted(i["metadata"]["name"] for i in services["items"]) == ["glm4-chat-cloud", "glm4-chat-edge"]
    runtimes = _get(cluster, "clusterservingruntimes")
    assert sorted(r["metadata"]["name"] for r in runtimes["items"]) == [
        "autoglm-server",
        "autoglm-server-edge",
    ]
    config = _get(cluster, "configmap", "glm4-chat-edge-autoglm", "-n", "ml")
    assert json.loads(config["data"]["desired.json"])["served"] == "glm4-chat-edge"


def test_namespaces_are_listed_and_fetched(cluster: EmulatedCluster) -> None:
    assert _get(cluster, "namespace", "ml")["metadata"]["name"] == "ml"
    assert "ml" in [n["metadata"]["name"] for n in _get(cluster, "namespaces")["items"]]


def test_kubectl_delete_removes_the_model(cluster: EmulatedCluster) -> None:
    assert cluster.kubectl("apply", "-f", str(EXAMPLES / "cloud-and-edge.yaml")).returncode == 0
    done = cluster.kubectl("delete", "agm", "glm4-chat", "-n", "ml", "--timeout=20s")
    assert done.returncode == 0, done.stderr
    missing = cluster.kubectl("get", "agm", "glm4-chat", "-n", "ml")
    assert missing.returncode != 0
    assert "not found" in missing.stderr.lower()


@pytest.mark.parametrize(
    ("target", "patch", "merged"),
    [
        ({"a": 1, "b": {"c": 2}}, {"b": {"c": None, "d": 3}}, {"a": 1, "b": {"d": 3}}),
        ({"a": [1, 2]}, {"a": [3]}, {"a": [3]}),
        ({"a": 1}, {"a": None}, {}),
        (None, {"a": {"b": 1}}, {"a": {"b": 1}}),
    ],
)
def test_merge_patch_is_rfc_7386(target: Any, patch: Any, merged: Any) -> None:
    assert merge_patch(target, patch) == merged


def test_kubectl_get_prints_the_crds_printer_columns(cluster: EmulatedCluster) -> None:
    assert cluster.kubectl("apply", "-f", str(EXAMPLES / "cloud-and-edge.yaml")).returncode == 0
    assert cluster.emulator is not None
    status = {"phase": "RollingOut", "revisions": {"stable": "a3a880f77966", "candidate": "c0f9b9d52d60"},
              "canary": {"step": 1, "weight": 10}}  # fmt: skip
    done = cluster.kubectl(
        "patch", "agm", "glm4-chat", "-n", "ml", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = cluster.kubectl("get", "agm", "-n", "ml")
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "STABLE", "CANDIDATE", "CANARY", "AGE"]
    assert row.split()[:5] == ["glm4-chat", "RollingOut", "a3a880f77966", "c0f9b9d52d60", "10"]
    assert row.split()[5].endswith("s")  # seconds old
    one = cluster.kubectl("get", "agm", "glm4-chat", "-n", "ml")
    assert one.stdout.splitlines()[1].split()[:2] == ["glm4-chat", "RollingOut"]


def test_server_side_apply_creates_a_missing_object(cluster: EmulatedCluster) -> None:
    done = cluster.kubectl("apply", "--server-side", "-f", str(EXAMPLES / "cloud-and-edge.yaml"))
    assert done.returncode == 0, done.stderr
    assert _get(cluster, "agm", "glm4-chat", "-n", "ml")["metadata"]["generation"] == 1


def test_kubectl_delete_waits_for_the_finalizer_and_then_returns(cluster: EmulatedCluster) -> None:
    """kubectl waits on a watch for the deletion; the watch must stream JSON (kubectl refuses
    application/octet-stream: a delete that waited then timed out under load in make test)."""
    import threading
    import time

    done = cluster.kubectl("apply", "-f", str(EXAMPLES / "cloud-and-edge.yaml"))
    assert done.returncode == 0, done.stderr
    patch = json.dumps({"metadata": {"finalizers": ["example.com/hold"]}})
    assert (
        cluster.kubectl("patch", "agm", "glm4-chat", "-n", "ml", "--type", "merge", "-p", patch).returncode
        == 0
    )
    result: dict[str, Any] = {}
    waiting = threading.Thread(
        target=lambda: result.update(
            done=cluster.kubectl("delete", "agm", "glm4-chat", "-n", "ml", "--timeout=30s")
        )
    )
    waiting.start()
    time.sleep(2)  # kubectl is watching by now: the object stays while the finalizer does
    assert waiting.is_alive()
    release = json.dumps({"metadata": {"finalizers": None}})
    assert (
        cluster.kubectl("patch", "agm", "glm4-chat", "-n", "ml", "--type", "merge", "-p", release).returncode
        == 0
    )
    waiting.join(40)
    assert result["done"].returncode == 0, result["done"].stderr
    assert "no stream serializers" not in result["done"].stderr
    assert cluster.kubectl("get", "agm", "glm4-chat", "-n", "ml").returncode != 0
