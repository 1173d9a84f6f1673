"""The Helm charts, rendered and linted by the real Helm engine (Helm's Go SDK through the
``helm-python-sdk`` wheel), every object checked against its schema: built-in kinds with
``kubernetes-validate`` (Kubernetes' own OpenAPI, strict: an unknown field fails), KServe, Argo and
Prometheus-operator kinds with the upstream CRDs in ``../shared/schemas``, kopf's peering with our
CRD of it. Every pod meets the ``restricted`` Pod Security standard; bad values fail at install."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from autoglm_inference.cli import serve_command
from autoglm_operator.kube.objects import cluster_serving_runtime
from tests.support import crd_schemas
from tools import chart as chart_tool

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[2]
APP, CRDS = REPO / "charts" / "autoglm", REPO / "charts" / "autoglm-crds"
NAMESPACE = "autoglm-system"
#: The oldest Kubernetes the chart declares (Chart.yaml's kubeVersion) is what its objects must fit.
KUBE_VERSION = "1.27"
#: Value sets that switch on every optional part of the templates.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"operator": {"watchNamespaces": ["ml", "team-a"], "replicas": 3}},
    "feedback on a claim": {
        "feedback": {
            "enabled": True,
            "feastStorage": "persistentVolumeClaim",
            "feastClaim": "feast",
            "api": {"enabled": True},
            "proposePrompts": True,
        },
        "operator": {
            "retrainingDatasets": "pvc://datasets/retraining",
            "prometheusUrl": "http://prometheus:9090",
            "verbose": True,
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "image": {"repository": "registry.example/autoglm", "tag": "0.1.0-cuda"},
    },
    "no monitors, no runtimes": {
        "monitoring": {"serviceMonitor": {"enabled": False}, "podMonitor": {"enabled": False}},
        "runtimes": {"cloud": {"enabled": False}, "edge": {"enabled": False}},
        "dashboards": {"enabled": False},
    },
}


def render(chart: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    manifests = helm.Chart.load(str(chart)).render(values or {}, name="autoglm", namespace=NAMESPACE)
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


def _peering_schema(kind: str) -> dict[str, Any]:
    for crd in yaml.safe_load_all((CRDS / "files" / "kopf.dev_peerings.yaml").read_text()):
        if crd["spec"]["names"]["kind"] == kind:
            schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            return schema
    raise KeyError(kind)


def schema_problems(obj: dict[str, Any]) -> list[str]:
    """What the API server would refuse or prune in ``obj``, by the schema of its kind."""
    key = (obj["apiVersion"], obj["kind"])
    if key in crd_schemas.FILES:
        return crd_schemas.problems(obj)
    if obj["apiVersion"] == "kopf.dev/v1":
        import jsonschema

        return [e.message for e in jsonschema.Draft7Validator(_peering_schema(obj["kind"])).iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def test_the_generated_files_are_fresh() -> None:
    assert chart_tool.main(["chart.py", "check"]) == 0, "run `make chart`"


@pytest.mark.parametrize("chart", [APP, CRDS], ids=["autoglm", "autoglm-crds"])
def test_helm_lints_the_charts_strictly(chart: Path) -> None:
    report = helm.lint(str(chart), strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}.0")
    found = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not found, found


@pytest.mark.parametrize("values", list(VALUE_SETS.values()), ids=list(VALUE_SETS))
def test_every_rendered_object_is_valid_for_its_schema(values: dict[str, Any]) -> None:
    objects = render(APP, values)
    assert objects
    for obj in objects:
        assert not schema_problems(obj), (obj["kind"], obj["metadata"]["name"], schema_problems(obj))


def test_a_validation_failure_is_caught() -> None:
    """The validators themselves: an object each of them must refuse."""
    deployment = next(o for o in render(APP) if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    assert schema_problems(deployment)
    monitor = next(o for o in render(APP) if o["kind"] == "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["scrapeEvery"] = "30s"
    assert schema_problems(monitor)


def test_the_crd_chart_installs_the_generated_crd_kept_on_uninstall() -> None:
    crds = {o["metadata"]["name"]: o for o in render(CRDS)}
    assert set(crds) == {"autoglmmodels.autoglm.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    generated = yaml.safe_load((REPO / "crds" / "autoglm.io_autoglmmodels.yaml").read_text())
    ours = copy.deepcopy(crds["autoglmmodels.autoglm.io"])
    assert ours["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert generated["metadata"].pop("labels").items() <= ours["metadata"].pop("labels").items()
    assert ours == generated
    assert all(o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm" for o in crds.values())
    assert "annotations" not in render(CRDS, {"keep": False})[0]["metadata"]
    assert [o["metadata"]["name"] for o in render(CRDS, {"kopfPeering": False})] == [
        "autoglmmodels.autoglm.io"
    ]


def test_the_runtimes_are_the_operators_own_with_the_release_image() -> None:
    image = "registry.example/autoglm:1.2.3"
    objects = render(APP, {"image": {"repository": "registry.example/autoglm", "tag": "1.2.3"}})
    runtimes = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ClusterServingRuntime"}
    for edge, name in ((False, "autoglm-server"), (True, "autoglm-server-edge")):
        expected = cluster_serving_runtime(image=image, edge=edge)
        rendered = runtimes[name]
        assert rendered["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert rendered["metadata"].get("annotations") == expected["metadata"].get("annotations")
        for container in rendered["spec"]["containers"]:
            assert container.pop("imagePullPolicy") == "IfNotPresent"
        assert rendered["spec"] == expected["spec"]
    kept = render(APP, {"runtimes": {"edge": {"cacheHostPath": "/var/lib/autoglm/models"}}})
    edge = next(o for o in kept if o["metadata"]["name"] == "autoglm-server-edge")
    kept_by_code = cluster_serving_runtime(
        image="i", edge=True, edge_cache_host_path="/var/lib/autoglm/models"
    )
    assert (
        edge["spec"]["volumes"] == kept_by_code["spec"]["volumes"]
    )  # the node's directory, as the code has it


def test_a_runtimes_stream_interval_reaches_its_servers_as_the_code_has_it() -> None:
    objects = render(APP, {"runtimes": {"edge": {"streamIntervalMs": 50}}})
    runtimes = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ClusterServingRuntime"}
    for name, edge, interval in (("autoglm-server", False, 0), ("autoglm-server-edge", True, 50)):
        rendered = next(c for c in runtimes[name]["spec"]["containers"] if c["name"] == "kserve-container")
        expected = next(
            c
            for c in cluster_serving_runtime(image="i", edge=edge, stream_interval_ms=interval)["spec"][
                "containers"
            ]
            if c["name"] == "kserve-container"
        )
        assert rendered["args"] == expected["args"]
        # The server's own parser reads the flag the pod will run with (the oracle for its spelling and
        # range; the other arguments name the pod's files, which are not here).
        flag = [a for a in rendered["args"] if a.startswith("--stream-interval-ms")]
        context = serve_command.make_context("serve", ["--model-name=m", "--model-uri=u", *flag])
        assert context.params["stream_interval_ms"] == interval


def test_a_stream_interval_outside_the_servers_range_is_refused_by_the_code() -> None:
    with pytest.raises(ValueError, match="stream_interval_ms must be 0 to 1000"):
        cluster_serving_runtime(image="i", edge=True, stream_interval_ms=1500)


# -- the restricted Pod Security standard (kubernetes.io/docs/concepts/security/pod-security-standards)

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}  # fmt: skip


def restricted_violations(pod: dict[str, Any], containers: list[dict[str, Any]]) -> list[str]:
    """Where a pod (its spec's pod-level fields) and its containers break the ``restricted`` standard,
    or our own rules on top: a read-only root filesystem, CPU and memory requests, a memory limit."""
    found = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(f"pod: {field}")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(kinds - RESTRICTED_VOLUMES)}")
    pod_context = pod.get("securityContext") or {}
    for c in containers:
        context, name = c.get("securityContext") or {}, c.get("name", "main")
        if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
            found.append(f"{name}: runAsNonRoot")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation")
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if (context.get("capabilities") or {}).get("drop") != ["ALL"] or (
            context.get("capabilities") or {}
        ).get("add"):
            found.append(f"{name}: capabilities")
        seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile")
        if context.get("readOnlyRootFilesystem") is not True:
            found.append(f"{name}: readOnlyRootFilesystem")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            found.append(f"{name}: hostPort")
        resources = c.get("resources") or {}
        if name != "kserve-container":  # its resources are each InferenceService's (the target's spec)
            if set(resources.get("requests") or {}) < {"cpu", "memory"}:
                found.append(f"{name}: requests")
            if "memory" not in (resources.get("limits") or {}):
                found.append(f"{name}: memory limit")
    return found


def pods(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    found = []
    for obj in objects:
        if obj["kind"] == "Deployment":
            spec = obj["spec"]["template"]["spec"]
            found.append((obj["metadata"]["name"], spec, spec["containers"] + spec.get("initContainers", [])))
        elif obj["kind"] == "ClusterServingRuntime":
            found.append((obj["metadata"]["name"], obj["spec"], obj["spec"]["containers"]))
    return found


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "rendered").glob("*.workflowtemplate.yaml")),
                         ids=lambda p: p.name)  # fmt: skip
def test_every_pipeline_pod_meets_the_restricted_standard_as_the_pipelines_account(path: Path) -> None:
    """The pods Argo makes of the WorkflowTemplates the operator writes (the examples', rendered)."""
    template = yaml.safe_load(path.read_text())
    spec = template["spec"]
    assert spec["serviceAccountName"] == "autoglm-pipeline"  # the chart's values.pipeline.serviceAccount
    for step in spec["templates"]:
        if "container" in step:
            pod = {"securityContext": spec["securityContext"], "volumes": step.get("volumes", [])}
            assert not restricted_violations(pod, [step["container"]]), (
                step["name"],
                restricted_violations(pod, [step["container"]]),
            )


def test_the_pipelines_account_may_only_report_step_outputs() -> None:
    objects = render(APP, {"operator": {"watchNamespaces": ["ml"]}})
    (role,) = [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == "autoglm-pipeline"]
    assert role["metadata"]["namespace"] == "ml"
    assert role["rules"] == [
        {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}
    ]
    (binding,) = [
        o for o in objects if o["kind"] == "RoleBinding" and o["metadata"]["name"] == "autoglm-pipeline"
    ]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "autoglm-pipeline", "namespace": "ml"}]
    assert any(o["kind"] == "ServiceAccount" and o["metadata"]["name"] == "autoglm-pipeline" for o in objects)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert (
        "--pipeline-service-account=autoglm-pipeline"
        in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    listed = render(APP, {"pipeline": {"namespaces": ["a", "b"]}})
    assert sorted(o["metadata"]["namespace"] for o in listed if o["kind"] == "Role") == ["a", "b"]
    assert not [o for o in render(APP) if o["kind"] == "Role"]  # every namespace watched, none listed


@pytest.mark.parametrize("values", list(VALUE_SETS.values()), ids=list(VALUE_SETS))
def test_every_pod_meets_the_restricted_pod_security_standard(values: dict[str, Any]) -> None:
    found = pods(render(APP, values))
    assert found or values.get("runtimes")
    for name, pod, containers in found:
        assert not restricted_violations(pod, containers), (name, restricted_violations(pod, containers))


def test_a_hostpath_edge_cache_is_flagged_as_outside_the_standard() -> None:
    objects = render(APP, {"runtimes": {"edge": {"cacheHostPath": "/var/lib/autoglm/models"}}})
    (edge,) = [p for p in pods(objects) if p[0] == "autoglm-server-edge"]
    assert restricted_violations(edge[1], edge[2]) == ["volume autoglm-model-cache: ['hostPath']"]


def test_the_operator_runs_as_the_chart_says() -> None:
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render(APP, VALUE_SETS["feedback on a claim"])}
    deployment = objects[("Deployment", "autoglm-operator")]
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["autoglm", "operator"]
    args = container["args"]
    assert "--all-namespaces" in args
    assert "--peering=autoglm" in args
    assert "--image=registry.example/autoglm:0.1.0-cuda" in args
    assert "--retraining-datasets=pvc://datasets/retraining" in args
    assert "--prometheus-url=http://prometheus:9090" in args
    assert "--verbose" in args
    assert "--propose-prompts" in args
    from autoglm_operator.cli.main import cli

    command = cli.get_command(click.Context(cli), "operator")
    assert command is not None
    parsed = command.make_context("operator", list(args))  # every flag the chart passes is the CLI's
    assert parsed.params["propose_prompts"] is True
    env = {e["name"]: e for e in container["env"]}
    assert env["AUTOGLM_AUDIT_URL"]["valueFrom"]["secretKeyRef"] == {"name": "autoglm-audit", "key": "url"}
    assert env["AUTOGLM_FEEDBACK_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "autoglm-feedback",
        "key": "url",
    }
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/mnt/pvc/datasets"]]["persistentVolumeClaim"] == {"claimName": "datasets"}
    assert volumes[mounts["/var/lib/autoglm/feast"]]["persistentVolumeClaim"] == {"claimName": "feast"}
    assert volumes[mounts["/tmp"]] == {"name": "tmp", "emptyDir": {}}
    # The metrics Service and the ServiceMonitor select the operator's pods on its metrics port.
    service = objects[("Service", "autoglm-operator-metrics")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    monitor = objects[("ServiceMonitor", "autoglm-operator")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert objects[("ClusterKopfPeering", "autoglm")]


def test_the_feedback_api_runs_alone_with_its_token_from_a_secret() -> None:
    objects = render(APP, VALUE_SETS["feedback on a claim"])
    (api,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-feedback")]
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["autoglm", "feedback", "serve"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert env["AUTOGLM_FEEDBACK_TOKEN"] == {"name": "autoglm-feedback", "key": "token"}
    (service,) = [
        o for o in objects if o["kind"] == "Service" and o["metadata"]["name"].endswith("-feedback")
    ]
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    assert not [o for o in render(APP) if o["metadata"]["name"].endswith("-feedback")]  # off by default


def test_named_namespaces_get_a_role_each_and_a_peering_each() -> None:
    objects = render(APP, VALUE_SETS["namespaced"])
    kinds = [(o["kind"], o["metadata"].get("namespace")) for o in objects]
    for namespace in ("ml", "team-a"):
        assert ("Role", namespace) in kinds
        assert ("RoleBinding", namespace) in kinds
        assert ("KopfPeering", namespace) in kinds
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {"--namespace=ml", "--namespace=team-a"} <= set(args)
    assert "--all-namespaces" not in args
    cluster_role = next(o for o in objects if o["kind"] == "ClusterRole")
    assert all(
        r["apiGroups"] != ["autoglm.io"] for r in cluster_role["rules"]
    )  # namespaced rules: Roles only


def test_no_rule_has_a_wildcard() -> None:
    for values in VALUE_SETS.values():
        for obj in render(APP, values):
            for rule in obj.get("rules") or []:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[field], (obj["kind"], rule)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"operator": {"replicas": 0}}, "replicas"),
        ({"operater": {"replicas": 2}}, "operater"),
        ({"operator": {"watchNamespaces": ["team-*"]}}, "watchNamespaces"),
        ({"operator": {"retrainingDatasets": "s3://bucket/datasets"}}, "retrainingDatasets"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"monitoring": {"podMonitor": {"interval": "often"}}}, "interval"),
        ({"operator": {"interval": 0.1}}, "interval"),
        ({"runtimes": {"edge": {"streamIntervalMs": 5000}}}, "streamIntervalMs"),
    ],
    ids=[
        "zero replicas",
        "a misspelt key",
        "a glob",
        "not a claim",
        "unknown pull policy",
        "a bad interval",
        "too short an interval",
        "a stream interval over the server's limit",
    ],
)
def test_bad_values_fail_at_install_naming_the_value(values: dict[str, Any], named: str) -> None:
    chart = helm.Chart.load(str(APP))
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(chart.merge_values(values))
    assert named in str(caught.value)
    with pytest.raises(helm.HelmError):
        chart.render(values, name="autoglm", namespace=NAMESPACE)


def test_values_yaml_documents_every_field() -> None:
    lines = (APP / "values.yaml").read_text().splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z]+:", line):
            assert lines[index - 1].lstrip().startswith("#"), f"values.yaml: {line.strip()} has no comment"
    defaults = yaml.safe_load((APP / "values.yaml").read_text())
    assert chart_tool.Values.model_validate(defaults) == chart_tool.Values()
