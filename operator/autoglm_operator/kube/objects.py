"""The Kubernetes objects the operator creates for an AutoGLMModel. Pure: no API calls, no clock.

- an Argo ``Workflow`` per pipeline run: ``workflowTemplateRef`` to the model's WorkflowTemplate
  (``autoglm_pipelines.workflow``) with the manifest of the run's revision as its parameter, and a
  name derived from (model, revision, attempt), so an operator that restarts between submitting
  and recording it gets a 409 for the same run instead of a second run (built with Hera);
- a KServe ``InferenceService`` per target (built with the ``kserve`` SDK's models): served by
  the ``autoglm-server`` ClusterServingRuntime (cloud pools) or ``autoglm-server-edge`` (kubeedge:
  RawDeployment, as edge nodes run no Knative; the node's own model cache), with the target's
  replicas, resources, GPUs, node selector and tolerations; kubeedge targets also require an edge
  node (``node-role.kubernetes.io/edge``) and tolerate its taint;
- a ``ConfigMap`` per target holding what its servers should serve (stable and candidate revisions,
  their URIs, digests and weights), which the agent beside each server pulls (mounted as a volume:
  on KubeEdge, edgecore keeps the ConfigMaps of its pods on the node, so a node cut off from the
  cloud keeps serving and finishes a swap it already received);
- the two ClusterServingRuntimes the chart ships: ``autoglm serve`` and the ``autoglm agent``
  sidecar in one pod.

Every object carries the model's labels and, when the model has a uid (it came from the API server),
an owner reference to it, so deleting the model deletes them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from typing import Any

import yaml
from hera.workflows import Parameter, Workflow
from hera.workflows.models import WorkflowTemplateRef
from kubernetes.client import (
    V1Affinity,
    V1Capabilities,
    V1ConfigMap,
    V1ConfigMapVolumeSource,
    V1Container,
    V1ContainerPort,
    V1EmptyDirVolumeSource,
    V1EnvVar,
    V1EnvVarSource,
    V1HostPathVolumeSource,
    V1HTTPGetAction,
    V1NodeAffinity,
    V1NodeSelector,
    V1NodeSelectorRequirement,
    V1NodeSelectorTerm,
    V1ObjectFieldSelector,
    V1ObjectMeta,
    V1OwnerReference,
    V1PodSecurityContext,
    V1Probe,
    V1ResourceRequirements,
    V1SeccompProfile,
    V1SecretKeySelector,
    V1SecurityContext,
    V1Toleration,
    V1Volume,
    V1VolumeMount,
)

from autoglm_api.resource import AutoGLMModel
from autoglm_api.spec import Target
from autoglm_api.status import PromptPolicy
from autoglm_core.feedback.store import URL_ENV as FEEDBACK_URL_ENV
from autoglm_inference.options import ADMIN_TOKEN_ENV, stream_interval_args
from autoglm_operator.agent.desired import Desired
from autoglm_operator.feedback_loop import VARIANTS_KEY, variants_document
from autoglm_pipelines.workflow import (
    IMAGE_UID,
    MANAGED_BY_LABEL,
    MANIFEST_PARAMETER,
    MODEL_LABEL,
    REVISION_LABEL,
    pipeline_manifest,
    template_name,
)

# kserve parses sys.argv when imported: keep the caller's flags (autoglm agent --config) from it.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    from kserve.api_client import ApiClient as KServeApiClient
    from kserve.models import (
        V1alpha1ClusterServingRuntime,
        V1alpha1ServingRuntimeSpec,
        V1alpha1SupportedModelFormat,
        V1beta1InferenceService,
        V1beta1InferenceServiceSpec,
        V1beta1ModelFormat,
        V1beta1ModelSpec,
        V1beta1PredictorSpec,
    )
finally:
    sys.argv = _argv

API_VERSION = "autoglm.io/v1alpha1"
KIND = "AutoGLMModel"
TARGET_LABEL = "autoglm.io/target"
POOL_LABEL = "autoglm.io/pool"
ATTEMPT_LABEL = "autoglm.io/attempt"

#: KServe's model format name the runtimes declare and the InferenceServices ask for.
MODEL_FORMAT = "autoglm"
CLOUD_RUNTIME = "autoglm-server"
EDGE_RUNTIME = "autoglm-server-edge"
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
EDGE_ROLE = "node-role.kubernetes.io/edge"
GPU_RESOURCE = "nvidia.com/gpu"
#: KServe adds ``-predictor`` (and more) to an InferenceService's name for its Deployment and
#: Service, which are DNS labels (63): names are kept to 45.
ISVC_NAME_LIMIT = 45
NAME_LIMIT = 63

#: Where the agent reads its desired state (the target's ConfigMap, mounted) and keeps artifacts.
AGENT_CONFIG_VOLUME = "autoglm-agent-config"
AGENT_CONFIG_PATH = "/etc/autoglm/agent"
AGENT_CONFIG_KEY = "desired.json"
CACHE_VOLUME = "autoglm-model-cache"
CACHE_PATH = "/var/cache/autoglm"
#: The containers' root filesystems are read-only: scratch space (Python's, torch's, Hugging Face's
#: caches under $HOME, which the image sets to /tmp) is an emptyDir.
TMP_VOLUME = "tmp"
TMP_PATH = "/tmp"
ADMIN_TOKEN_SECRET = "autoglm-admin-token"
#: The Secret holding the feedback store's URL (key ``url``); optional: without it, no feedback.
FEEDBACK_SECRET = "autoglm-feedback"
SERVER_PORT = 8080
#: The server's target label, from its pod's autoglm.io/target label (the runtime serves every target).
TARGET_ENV = "AUTOGLM_TARGET"

DEFAULT_CPU = "1"
DEFAULT_MEMORY = "2Gi"


def bounded(name: str, limit: int = NAME_LIMIT) -> str:
    """``name`` if it fits ``limit``, else its start and 8 hex digits of its hash (still unique)."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def _model_name(model: AutoGLMModel) -> str:
    if not model.metadata.name:
        raise ValueError("metadata.name is required (generateName is not resolved yet)")
    return model.metadata.name


def workflow_name(model: AutoGLMModel, revision: str, attempt: int) -> str:
    """``autoglm-<model>-<revision>-<attempt>``: one name per run, so a repeated submit is a 409."""
    return bounded(f"{template_name(model)}-{revision}-{attempt}")


def inference_service_name(model: AutoGLMModel, target: str) -> str:
    return bounded(f"{_model_name(model)}-{target}", ISVC_NAME_LIMIT)


def agent_config_name(model: AutoGLMModel, target: str) -> str:
    return bounded(f"{inference_service_name(model, target)}-autoglm")


def labels(model: AutoGLMModel, **more: str) -> dict[str, str]:
    return {MANAGED_BY_LABEL: "autoglm", MODEL_LABEL: _model_name(model), **more}


def owner_references(model: AutoGLMModel) -> list[V1OwnerReference] | None:
    """The model as controller owner (garbage collection deletes what it owns); None without a uid."""
    if not model.metadata.uid:
        return None
    return [
        V1OwnerReference(
            api_version=API_VERSION,
            kind=KIND,
            name=_model_name(model),
            uid=model.metadata.uid,
            controller=True,
            block_owner_deletion=True,
        )
    ]


@functools.cache
def _serializer() -> Any:
    return KServeApiClient()


def to_dict(obj: Any) -> dict[str, Any]:
    """A kubernetes/kserve SDK model as the JSON the API server takes (camelCase, no nulls): kserve's
    own client, whose serializer reads each model's attribute map (kubernetes' newer one falls back to
    ``to_dict()``, snake_case, for models it did not generate)."""
    data = _serializer().sanitize_for_serialization(obj)
    assert isinstance(data, dict)
    return data


# -- the pipeline run ---------------------------------------------------------------------------


def workflow(
    model: AutoGLMModel, revision: str, *, attempt: int = 1, baseline: bool = False
) -> dict[str, Any]:
    """The Argo ``Workflow`` of one pipeline run of ``revision``, from the model's WorkflowTemplate."""
    manifest = yaml.safe_dump(pipeline_manifest(model), sort_keys=False, allow_unicode=True)
    run_labels = labels(model, **{REVISION_LABEL: revision, ATTEMPT_LABEL: str(attempt)})
    built = Workflow(
        name=workflow_name(model, revision, attempt),
        namespace=model.metadata.namespace,
        labels=run_labels,
        annotations={"autoglm.io/baseline": "true" if baseline else "false"},
        workflow_template_ref=WorkflowTemplateRef(name=template_name(model)),
        arguments=[Parameter(name=MANIFEST_PARAMETER, value=manifest)],
    )
    data: dict[str, Any] = built.to_dict()
    owners = owner_references(model)
    if owners:
        data["metadata"]["ownerReferences"] = [to_dict(o) for o in owners]
    return data


# -- serving --------------------------------------------------------------------------------------


def _target_labels(model: AutoGLMModel, target: Target) -> dict[str, str]:
    return labels(model, **{TARGET_LABEL: target.name, POOL_LABEL: target.pool})


def _target_metadata(
    model: AutoGLMModel, target: Target, name: str, annotations: dict[str, str] | None = None
) -> V1ObjectMeta:
    """A target's object: in the model's namespace, with the target's labels, owned by the model."""
    return V1ObjectMeta(
        name=name,
        namespace=model.metadata.namespace,
        labels=_target_labels(model, target),
        annotations=annotations,
        owner_references=owner_references(model),
    )


def runtime_name(target: Target) -> str:
    return EDGE_RUNTIME if target.pool == "kubeedge" else CLOUD_RUNTIME


def _resources(target: Target) -> V1ResourceRequirements:
    requests: dict[str, str] = {
        "cpu": str(target.resources.cpu or DEFAULT_CPU),
        "memory": str(target.resources.memory or DEFAULT_MEMORY),
    }
    # Memory limit = request: a server past it is OOM-killed at a known size instead of the node
    # evicting whichever pod is largest; GPUs are an extended resource (request = limit, required).
    limits = {"memory": requests["memory"]}
    if target.resources.gpu:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(target.resources.gpu)
    return V1ResourceRequirements(requests=requests, limits=limits)


def _tolerations(target: Target) -> list[V1Toleration] | None:
    tolerations = [
        V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect)
        for t in target.tolerations
    ]
    if target.pool == "kubeedge" and not any(t.key == EDGE_ROLE for t in target.tolerations):
        tolerations.append(V1Toleration(key=EDGE_ROLE, operator="Exists", effect="NoSchedule"))
    return tolerations or None


def _affinity(target: Target) -> V1Affinity | None:
    if target.pool != "kubeedge":
        return None
    edge = V1NodeSelectorRequirement(key=EDGE_ROLE, operator="Exists")
    return V1Affinity(
        node_affinity=V1NodeAffinity(
            required_during_scheduling_ignored_during_execution=V1NodeSelector(
                node_selector_terms=[V1NodeSelectorTerm(match_expressions=[edge])]
            )
        )
    )


def inference_service(model: AutoGLMModel, target: Target, desired: Desired) -> dict[str, Any]:
    """The target's ``InferenceService``: its servers start on the stable revision (``storageUri``)
    and the agent beside them swaps what the target's ConfigMap names."""
    annotations = {DEPLOYMENT_MODE_ANNOTATION: "RawDeployment"} if target.pool == "kubeedge" else None
    target_labels = _target_labels(model, target)
    predictor = V1beta1PredictorSpec(
        min_replicas=target.replicas.min,
        max_replicas=target.replicas.max,
        node_selector=dict(target.node_selector) or None,
        tolerations=_tolerations(target),
        affinity=_affinity(target),
        labels=dict(target_labels),
        security_context=pod_security(),
        volumes=[
            V1Volume(
                name=AGENT_CONFIG_VOLUME,
                config_map=V1ConfigMapVolumeSource(name=agent_config_name(model, target.name)),
            )
        ],
        model=V1beta1ModelSpec(
            name="kserve-container",
            model_format=V1beta1ModelFormat(name=MODEL_FORMAT),
            runtime=runtime_name(target),
            storage_uri=desired.stable.uri,
            resources=_resources(target),
        ),
    )
    isvc = V1beta1InferenceService(
        api_version="serving.kserve.io/v1beta1",
        kind="InferenceService",
        metadata=_target_metadata(model, target, inference_service_name(model, target.name), annotations),
        spec=V1beta1InferenceServiceSpec(predictor=predictor),
    )
    return to_dict(isvc)


def agent_config(
    model: AutoGLMModel, target: Target, desired: Desired, *, prompt_policy: PromptPolicy | None = None
) -> dict[str, Any]:
    """The ConfigMap the target's agents read: ``desired.json`` (stable, candidate, weights) and the
    model's generation it was written for; and the servers' ``prompt-variants.yaml`` (the variants
    and the prompt policy's shares: ``prompt_policy``, else the model's status's)."""
    policy = prompt_policy or (model.status.prompt_policy if model.status else None)
    document = {
        "model": _model_name(model),
        # The name its servers serve it under: KServe's {{.Name}}, the InferenceService's name.
        "served": inference_service_name(model, target.name),
        "namespace": model.metadata.namespace,
        "target": target.name,
        **desired.to_json(),
    }
    config_map = V1ConfigMap(
        api_version="v1",
        kind="ConfigMap",
        metadata=_target_metadata(model, target, agent_config_name(model, target.name)),
        data={
            AGENT_CONFIG_KEY: json.dumps(document, indent=2, sort_keys=True) + "\n",
            VARIANTS_KEY: variants_document(
                model, policy.shares if policy else None, policy.proposals if policy else ()
            ),
        },
    )
    return to_dict(config_map)


def _downward(name: str, field: str) -> list[V1EnvVar]:
    """An environment variable from the downward API: the agent reports on its own pod."""
    return [V1EnvVar(name=name, value_from=V1EnvVarSource(field_ref=V1ObjectFieldSelector(field_path=field)))]


def container_security() -> V1SecurityContext:
    """The Kubernetes ``restricted`` Pod Security standard for one container, and a read-only root."""
    return V1SecurityContext(
        run_as_non_root=True,
        run_as_user=IMAGE_UID,
        run_as_group=IMAGE_UID,
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        capabilities=V1Capabilities(drop=["ALL"]),
        seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
    )


def pod_security() -> V1PodSecurityContext:
    """The same at the pod level (KServe's injected storage initializer included); ``fsGroup`` lets
    the image's user write the cache volume."""
    return V1PodSecurityContext(
        run_as_non_root=True,
        fs_group=IMAGE_UID,
        seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
    )


def cluster_serving_runtime(
    *, image: str, edge: bool, edge_cache_host_path: str | None = None, stream_interval_ms: float = 0
) -> dict[str, Any]:
    """``autoglm-server`` (cloud pools) or ``autoglm-server-edge`` (kubeedge): ``autoglm serve`` as
    KServe's model container and ``autoglm agent`` as its sidecar, sharing the model cache.

    ``stream_interval_ms`` (the chart's ``runtimes.<cloud|edge>.streamIntervalMs``): the servers gather
    streamed tokens and send an event at most that often (``autoglm serve --stream-interval-ms``); 0,
    the default, sends an event per token. On a CPU node whose every core decodes, each event costs
    decode time (README: CPU runtimes).

    The cache is an emptyDir (a pod that restarts fetches its artifacts again). On an edge node
    ``edge_cache_host_path`` keeps them on the node across pods instead; a hostPath volume is outside
    the ``restricted`` and ``baseline`` Pod Security standards, so it is the platform team's choice
    (the chart's ``runtimes.edge.cacheHostPath``), never the default."""
    interval_args = stream_interval_args(stream_interval_ms)
    cache = (
        V1Volume(
            name=CACHE_VOLUME,
            host_path=V1HostPathVolumeSource(path=edge_cache_host_path, type="DirectoryOrCreate"),
        )
        if edge and edge_cache_host_path
        else V1Volume(name=CACHE_VOLUME, empty_dir=V1EmptyDirVolumeSource())
    )
    scratch = V1Volume(name=TMP_VOLUME, empty_dir=V1EmptyDirVolumeSource())
    mounts = [
        V1VolumeMount(name=CACHE_VOLUME, mount_path=CACHE_PATH),
        V1VolumeMount(name=TMP_VOLUME, mount_path=TMP_PATH),
    ]
    token_env = V1EnvVar(
        name=ADMIN_TOKEN_ENV,
        value_from=V1EnvVarSource(secret_key_ref=V1SecretKeySelector(name=ADMIN_TOKEN_SECRET, key="token")),
    )
    ready = V1Probe(http_get=V1HTTPGetAction(path="/v2/health/ready", port=SERVER_PORT), period_seconds=5)
    server = V1Container(
        name="kserve-container",
        image=image,
        command=["autoglm", "serve"],
        args=[
            "--model-name={{.Name}}",
            "--model-uri=/mnt/models",
            "--host=0.0.0.0",
            f"--http-port={SERVER_PORT}",
            f"--cache-dir={CACHE_PATH}",
            f"--model-root={CACHE_PATH}",
            f"--target=$({TARGET_ENV})",  # the metrics' target label: the AutoGLMModel's target name
            # The prompt policy, from the target's ConfigMap; re-read when the kubelet swaps it in.
            f"--prompt-variants={AGENT_CONFIG_PATH}/{VARIANTS_KEY}",
            *interval_args,
        ],
        env=[
            token_env,
            *_downward(TARGET_ENV, f"metadata.labels['{TARGET_LABEL}']"),
            # The feedback store (request log and POST /v1/feedback) when the Secret exists.
            V1EnvVar(
                name=FEEDBACK_URL_ENV,
                value_from=V1EnvVarSource(
                    secret_key_ref=V1SecretKeySelector(name=FEEDBACK_SECRET, key="url", optional=True)
                ),
            ),
        ],
        ports=[V1ContainerPort(container_port=SERVER_PORT, protocol="TCP")],
        volume_mounts=[
            *mounts,
            V1VolumeMount(name=AGENT_CONFIG_VOLUME, mount_path=AGENT_CONFIG_PATH, read_only=True),
        ],
        readiness_probe=ready,
        security_context=container_security(),
    )
    agent = V1Container(
        name="autoglm-agent",
        image=image,
        command=["autoglm", "agent"],
        args=[
            f"--config={AGENT_CONFIG_PATH}/{AGENT_CONFIG_KEY}",
            f"--server=http://127.0.0.1:{SERVER_PORT}",
            f"--cache-dir={CACHE_PATH}",
        ],
        env=[
            token_env,
            *_downward("POD_NAME", "metadata.name"),
            *_downward("POD_NAMESPACE", "metadata.namespace"),
        ],
        volume_mounts=[
            *mounts,
            V1VolumeMount(name=AGENT_CONFIG_VOLUME, mount_path=AGENT_CONFIG_PATH, read_only=True),
        ],
        resources=V1ResourceRequirements(
            requests={"cpu": "50m", "memory": "64Mi"}, limits={"cpu": "500m", "memory": "256Mi"}
        ),
        security_context=container_security(),
    )
    runtime = V1alpha1ClusterServingRuntime(
        api_version="serving.kserve.io/v1alpha1",
        kind="ClusterServingRuntime",
        metadata=V1ObjectMeta(
            name=EDGE_RUNTIME if edge else CLOUD_RUNTIME,
            labels={MANAGED_BY_LABEL: "autoglm"},
            annotations={DEPLOYMENT_MODE_ANNOTATION: "RawDeployment"} if edge else None,
        ),
        spec=V1alpha1ServingRuntimeSpec(
            supported_model_formats=[
                V1alpha1SupportedModelFormat(name=MODEL_FORMAT, version="1", auto_select=True)
            ],
            protocol_versions=["v1", "v2"],
            containers=[server, agent],
            volumes=[cache, scratch],
        ),
    )
    return to_dict(runtime)
