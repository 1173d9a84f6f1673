"""The objects the operator creates: valid against the upstream CRDs, named so a retry is idempotent,
placed on the nodes each pool means (KubeEdge edge nodes, GPU nodes), owned by the model."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from autoglm_api.resource import AutoGLMModel
from autoglm_api.validation import validate_document, validate_text
from autoglm_core.variants import rollout_revision, target_revisions
from autoglm_operator.agent.desired import Assignment, Desired
from autoglm_operator.cli.main import cli
from autoglm_operator.kube import objects
from autoglm_operator.kube.render import cluster_objects, render_yaml
from tests.conftest import EXAMPLES
from tests.support.crd_schemas import problems

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DESIRED = Desired(stable=Assignment("abc123def456", "s3://bucket/m/abc123def456", "0" * 64))


def _example(path: Path) -> AutoGLMModel:
    (result,) = validate_text(path.read_text())
    assert result.model is not None, result.problems
    return result.model


def _model(doc: dict[str, Any]) -> AutoGLMModel:
    result = validate_document(doc)
    assert result.model is not None, result.problems
    return result.model


@pytest.fixture(scope="module")
def cloud_and_edge() -> AutoGLMModel:
    return _example(EXAMPLES / "cloud-and-edge.yaml")


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_committed_objects_match_the_builders(example: Path) -> None:
    committed = EXAMPLES / "rendered" / f"{example.stem}.objects.yaml"
    assert committed.read_text() == render_yaml(_example(example)), "run `make render`"


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_every_object_is_valid_against_its_upstream_crd(example: Path) -> None:
    checked = 0
    for obj in cluster_objects(_example(example)):
        if obj["kind"] == "ConfigMap":
            assert obj["apiVersion"] == "v1"
            assert set(obj["data"]) == {objects.AGENT_CONFIG_KEY, objects.VARIANTS_KEY}
            # The server's own parser takes the prompt-variants document (an equal split at first).
            from autoglm_inference.prompts import Variants

            variants = Variants.parse(yaml.safe_load(obj["data"][objects.VARIANTS_KEY]), "ConfigMap")
            assert sum(variants.weights.values()) == pytest.approx(1.0)
            continue
        assert problems(obj) == [], obj["metadata"]["name"]
        checked += 1
    assert checked >= 5


def test_the_schema_check_catches_a_wrong_type_and_a_field_kserve_would_prune(
    cloud_and_edge: AutoGLMModel,
) -> None:
    isvc = objects.inference_service(cloud_and_edge, cloud_and_edge.spec.targets[0], DESIRED)
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    isvc["spec"]["predictor"]["model"]["storageURI"] = "s3://x"  # the field is storageUri
    found = problems(isvc)
    assert any("minReplicas" in p for p in found)
    assert any("storageURI" in p and "prunes" in p for p in found)


def test_an_edge_target_runs_raw_on_edge_nodes_with_the_node_cache(cloud_and_edge: AutoGLMModel) -> None:
    edge = next(t for t in cloud_and_edge.spec.targets if t.pool == "kubeedge")
    isvc = objects.inference_service(cloud_and_edge, edge, DESIRED)
    assert isvc["metadata"]["annotations"] == {"serving.kserve.io/deploymentMode": "RawDeployment"}
    predictor = isvc["spec"]["predictor"]
    terms = predictor["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [
        {"matchExpressions": [{"key": "node-role.kubernetes.io/edge", "operator": "Exists"}]}
    ]
    assert {"key": "node-role.kubernetes.io/edge", "operator": "Exists", "effect": "NoSchedule"} in predictor[
        "tolerations"
    ]
    assert predictor["model"]["runtime"] == objects.EDGE_RUNTIME
    assert predictor["model"]["storageUri"] == DESIRED.stable.uri
    assert "nvidia.com/gpu" not in predictor["model"]["resources"]["requests"]
    runtime = objects.cluster_serving_runtime(image="img", edge=True)
    (cache,) = [v for v in runtime["spec"]["volumes"] if v["name"] == objects.CACHE_VOLUME]
    assert cache == {"name": objects.CACHE_VOLUME, "emptyDir": {}}  # restricted: no hostPath by default
    kept = objects.cluster_serving_runtime(image="img", edge=True, edge_cache_host_path="/var/lib/autoglm")
    (cache,) = [v for v in kept["spec"]["volumes"] if v["name"] == objects.CACHE_VOLUME]
    assert cache["hostPath"] == {"path": "/var/lib/autoglm", "type": "DirectoryOrCreate"}  # survives pods


def test_an_edge_toleration_the_user_gave_is_not_doubled(minimal: dict[str, Any]) -> None:
    minimal["spec"]["targets"] = [
        {"name": "edge", "pool": "kubeedge",
         "tolerations": [{"key": "node-role.kubernetes.io/edge", "operator": "Exists"}]}
    ]  # fmt: skip
    model = _model(minimal)
    isvc = objects.inference_service(model, model.spec.targets[0], DESIRED)
    assert isvc["spec"]["predictor"]["tolerations"] == [
        {"key": "node-role.kubernetes.io/edge", "operator": "Exists"}
    ]


def test_a_gpu_target_requests_and_limits_its_gpus_on_its_nodes(cloud_and_edge: AutoGLMModel) -> None:
    cloud = next(t for t in cloud_and_edge.spec.targets if t.pool == "cloud-gpu")
    isvc = objects.inference_service(cloud_and_edge, cloud, DESIRED)
    predictor = isvc["spec"]["predictor"]
    assert "annotations" not in isvc["metadata"]  # the cluster's default deployment mode
    assert "affinity" not in predictor
    assert predictor["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    resources = predictor["model"]["resources"]
    assert resources["requests"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert resources["limits"] == {"memory": "16Gi", "nvidia.com/gpu": "1"}
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 4)
    assert predictor["model"]["runtime"] == objects.CLOUD_RUNTIME


def test_the_servers_mount_their_targets_configmap_which_names_what_to_serve(
    cloud_and_edge: AutoGLMModel,
) -> None:
    target = cloud_and_edge.spec.targets[1]
    desired = Desired(
        stable=Assignment("aaa", "s3://b/aaa", "1" * 64, weight=90),
        candidate=Assignment("bbb", "s3://b/bbb", "2" * 64, weight=10),
    )
    isvc = objects.inference_service(cloud_and_edge, target, desired)
    config = objects.agent_config(cloud_and_edge, target, dataclasses.replace(desired, generation=3))
    (volume,) = isvc["spec"]["predictor"]["volumes"]
    assert volume == {"name": objects.AGENT_CONFIG_VOLUME, "configMap": {"name": config["metadata"]["name"]}}
    document = json.loads(config["data"][objects.AGENT_CONFIG_KEY])
    assert document["target"] == target.name
    assert document["generation"] == 3
    assert document["stable"] == {"revision": "aaa", "uri": "s3://b/aaa", "sha256": "1" * 64, "weight": 90}
    assert document["candidate"]["revision"] == "bbb"
    assert document["candidate"]["weight"] == 10
    # The agent sidecar of the runtime reads it where the volume is mounted.
    runtime = objects.cluster_serving_runtime(image="img", edge=target.pool == "kubeedge")
    agent = next(c for c in runtime["spec"]["containers"] if c["name"] == "autoglm-agent")
    mount = next(m for m in agent["volumeMounts"] if m["name"] == objects.AGENT_CONFIG_VOLUME)
    assert f"--config={mount['mountPath']}/{objects.AGENT_CONFIG_KEY}" in agent["args"]


def test_a_workflow_per_run_refers_to_the_template_with_that_revisions_manifest(
    cloud_and_edge: AutoGLMModel,
) -> None:
    revision = rollout_revision(cloud_and_edge.spec)
    first = objects.workflow(cloud_and_edge, revision)
    assert first == objects.workflow(cloud_and_edge, revision)  # a restart submits the same object
    assert first["metadata"]["name"] == f"autoglm-glm4-chat-{revision}-1"
    assert objects.workflow(cloud_and_edge, revision, attempt=2)["metadata"]["name"].endswith(f"{revision}-2")
    assert first["spec"]["workflowTemplateRef"] == {"name": "autoglm-glm4-chat"}
    (parameter,) = first["spec"]["arguments"]["parameters"]
    manifest = yaml.safe_load(parameter["value"])
    assert _model(manifest).spec == cloud_and_edge.spec
    assert first["metadata"]["labels"]["autoglm.io/revision"] == revision
    assert problems(first) == []


def test_names_stay_dns_labels_within_kubernetes_limits(minimal: dict[str, Any]) -> None:
    minimal["metadata"]["name"] = "a-very-long-model-name-" + "x" * 17  # the API allows 40
    minimal["spec"]["targets"] = [{"name": "edge-target-one", "pool": "kubeedge"}]
    model = _model(minimal)
    names = [
        objects.workflow_name(model, "0123456789ab", 12),
        objects.inference_service_name(model, "edge-target-one"),
        objects.agent_config_name(model, "edge-target-one"),
    ]
    assert all(DNS_LABEL.match(n) for n in names), names
    assert [len(n) <= limit for n, limit in zip(names, (63, objects.ISVC_NAME_LIMIT, 63), strict=True)] == [
        True
    ] * 3
    # Still one name per run: two attempts, two names.
    assert objects.workflow_name(model, "0123456789ab", 12) != objects.workflow_name(
        model, "0123456789ab", 13
    )


def test_objects_of_a_model_from_the_api_server_are_owned_by_it(minimal: dict[str, Any]) -> None:
    assert (
        "ownerReferences"
        not in objects.agent_config(_model(minimal), _model(minimal).spec.targets[0], DESIRED)["metadata"]
    )
    minimal["metadata"].update(namespace="ml", uid="6f1c8e1e-0000-4000-8000-000000000001")
    model = _model(minimal)
    expected = [{"apiVersion": "autoglm.io/v1alpha1", "kind": "AutoGLMModel", "name": "tiny",
                 "uid": "6f1c8e1e-0000-4000-8000-000000000001", "controller": True, "blockOwnerDeletion": True}]  # fmt: skip
    target = model.spec.targets[0]
    for obj in (
        objects.inference_service(model, target, DESIRED),
        objects.agent_config(model, target, DESIRED),
        objects.workflow(model, "abc"),
    ):
        assert obj["metadata"]["ownerReferences"] == expected
        assert obj["metadata"]["labels"]["autoglm.io/model"] == "tiny"


def test_each_targets_stable_is_the_revision_of_its_precision(cloud_and_edge: AutoGLMModel) -> None:
    revisions = target_revisions(cloud_and_edge.spec)
    services = [o for o in cluster_objects(cloud_and_edge) if o["kind"] == "InferenceService"]
    for isvc in services:
        target = isvc["metadata"]["labels"]["autoglm.io/target"]
        assert isvc["spec"]["predictor"]["model"]["storageUri"].endswith("/" + revisions[target])


def test_cli_prints_the_stream_and_refuses_a_bad_manifest(tmp_path: Path) -> None:
    example = EXAMPLES / "cloud-and-edge.yaml"
    result = CliRunner().invoke(cli, ["objects", str(example)])
    assert result.exit_code == 0, result.output
    assert result.output == render_yaml(_example(example))
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: autoglm.io/v1alpha1\nkind: AutoGLMModel\nmetadata: {name: x}\nspec: {}\n")
    result = CliRunner().invoke(cli, ["objects", str(bad)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1


def test_the_agent_knows_its_own_pod_to_report_on() -> None:
    runtime = objects.cluster_serving_runtime(image="img", edge=True)
    agent = next(c for c in runtime["spec"]["containers"] if c["name"] == "autoglm-agent")
    fields = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in agent["env"]}
    assert fields["POD_NAME"] == "metadata.name"
    assert fields["POD_NAMESPACE"] == "metadata.namespace"
