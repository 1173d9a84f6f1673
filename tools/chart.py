"""What ``make chart`` generates in ``charts/autoglm`` (``tests/unit/test_chart.py`` fails when a
committed file drifts from it):

- ``values.yaml`` (every field with its documentation) and ``values.schema.json`` (which Helm checks
  at install, so a bad value fails there), both from the pydantic models below;
- ``files/runtimes/{cloud,edge}.yaml``: the ClusterServingRuntimes as the operator's code builds
  them (``autoglm_operator.kube.objects.cluster_serving_runtime``); the chart's template sets the
  image, labels and the edge cache's hostPath on them, so chart and code cannot disagree.

Usage: ``python -m tools.chart write`` | ``python -m tools.chart check``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from autoglm_inference.options import MAX_STREAM_INTERVAL_MS
from tools import generated as generated_files

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "autoglm"
VALUES, SCHEMA = CHART / "values.yaml", CHART / "values.schema.json"

Quantity = str


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Image(Strict):
    repository: str = Field(
        "autoglm",
        description="The AutoGLM image (the repository's Dockerfile): operator, servers, agents and pipeline steps.",
    )
    tag: str = Field("", description="Its tag; empty: the chart's appVersion.")
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="When the kubelet pulls it."
    )


class Requests(Strict):
    cpu: Quantity = Field(description="CPU, e.g. 100m.")
    memory: Quantity = Field(description="Memory, e.g. 256Mi.")


class Resources(Strict):
    requests: Requests = Field(description="What the scheduler reserves.")
    limits: Requests = Field(description="The most the container may use (memory past it: OOM-killed).")


class Operator(Strict):
    replicas: int = Field(
        2,
        ge=1,
        description="Replicas of the operator. They elect one through kopf's peering (a ClusterKopfPeering, or KopfPeering per watched namespace); the others wait and take over when it stops.",
    )
    watchNamespaces: list[
        Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
    ] = Field(
        default_factory=list,
        description="Namespaces whose AutoGLMModels the operator reconciles, each with its own Role (names, not globs: RBAC grants per namespace). Empty: every namespace, with a ClusterRole.",
    )
    peering: str = Field(
        "autoglm",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="The kopf peering object the replicas coordinate through (this chart creates it).",
    )
    interval: float = Field(
        5.0, ge=0.5, description="Seconds between reconciles of each model besides those its events trigger."
    )
    artifactRepository: str = Field(
        "s3://autoglm-artifacts",
        description="Argo's default artifact repository as a URI (s3://, gs://, file://): where published artifacts lie.",
    )
    prometheusUrl: str = Field(
        "",
        description="The Prometheus HTTP API that scrapes the servers: the canaries' figures. Empty: a canary holds (Inconclusive) and never promotes on its own.",
    )
    targetSelector: str = Field(
        'target="{target}"',
        description="PromQL label matchers that select one target's servers; {model} and {target} are filled in.",
    )
    retrainingDatasets: str = Field(
        "",
        pattern=r"^(pvc://[^/]+(/.*)?)?$",
        description="pvc://CLAIM/PATH where retraining datasets are written (the claim is mounted into the operator at /mnt/pvc/CLAIM). Empty: spec.feedback.retraining triggers nothing.",
    )
    metricsPort: int = Field(
        9090,
        ge=1,
        le=65535,
        description="The operator's /metrics port (reconciles, their duration, decisions), scraped by the ServiceMonitor.",
    )
    healthPort: int = Field(8080, ge=1, le=65535, description="kopf's liveness endpoint (/healthz).")
    verbose: bool = Field(False, description="Log at DEBUG.")
    resources: Resources = Field(
        default_factory=lambda: Resources(
            requests=Requests(cpu="100m", memory="256Mi"), limits=Requests(cpu="1", memory="1Gi")
        ),
        description="The operator container's requests and limits.",
    )
    nodeSelector: dict[str, str] = Field(
        default_factory=dict, description="The operator pods' node selector."
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="The operator pods' tolerations."
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="The operator pods' affinity; empty: spread the replicas across nodes (preferred).",
    )
    podAnnotations: dict[str, str] = Field(
        default_factory=dict, description="Extra annotations on the operator pods."
    )


class SecretRef(Strict):
    existingSecret: str = Field(
        description="A Secret in the release's namespace (created by you: this chart never holds a credential)."
    )
    key: str = Field("url", description="The key holding the value.")


class Audit(Strict):
    database: SecretRef = Field(
        default_factory=lambda: SecretRef(existingSecret="autoglm-audit", key="url"),
        description="The audit ledger's database URL (postgresql+psycopg://...), from a Secret. Every replica writes to it; SQLite cannot be shared by pods.",
    )


class FeedbackApi(Strict):
    enabled: bool = Field(
        False,
        description="Run `autoglm feedback serve`: POST /v1/feedback on its own Service, for clients that rate answers elsewhere than on the model servers (which serve the same route).",
    )
    replicas: int = Field(2, ge=1, description="Its replicas (stateless: the store is the database).")
    port: int = Field(8081, ge=1, le=65535, description="Its port.")
    token: SecretRef = Field(
        default_factory=lambda: SecretRef(existingSecret="autoglm-feedback", key="token"),
        description="The writers' bearer token, from a Secret.",
    )
    resources: Resources = Field(
        default_factory=lambda: Resources(
            requests=Requests(cpu="50m", memory="128Mi"), limits=Requests(cpu="500m", memory="512Mi")
        ),
        description="Its requests and limits.",
    )


class Feedback(Strict):
    enabled: bool = Field(
        False, description="Run the feedback loop (prompt policy, drift, canary retraining) in the operator."
    )
    database: SecretRef = Field(
        default_factory=lambda: SecretRef(existingSecret="autoglm-feedback", key="url"),
        description="The feedback store the servers log to (PostgreSQL), from a Secret. The servers of each model's namespace read theirs from a Secret named autoglm-feedback (key url) there.",
    )
    onlineStore: SecretRef = Field(
        default_factory=lambda: SecretRef(existingSecret="autoglm-feedback", key="onlineStore"),
        description="Feast's online store (redis://HOST:PORT or postgresql://...), from a Secret; without that key, "
        "the SQLite store in the Feast folder (one replica's own: set it when replicas take over from each other).",
    )
    feastStorage: Literal["emptyDir", "persistentVolumeClaim"] = Field(
        "emptyDir",
        description="Where the Feast repository's registry and offline files live: an emptyDir (rebuilt from the feedback store when a pod restarts) or the claim named by feastClaim.",
    )
    proposePrompts: bool = Field(
        False,
        description="OPRO: the operator asks each model's first target for new system prompts from the past (prompt, "
        "score) pairs; each joins the bandit as a new arm and is recorded in the ledger (PromptProposed).",
    )
    api: FeedbackApi = Field(default_factory=FeedbackApi, description="The feedback API on its own.")
    feastClaim: str = Field(
        "", description="The PersistentVolumeClaim for feastStorage: persistentVolumeClaim."
    )


class Pipeline(Strict):
    serviceAccount: str = Field(
        "autoglm-pipeline",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="The ServiceAccount the pipeline's pods run as. Argo's executor reports each step's outputs "
        "through it (workflowtaskresults: create, patch), and nothing else.",
    )
    namespaces: list[Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]] = (
        Field(
            default_factory=list,
            description="Namespaces to create that ServiceAccount and its Role in: those where AutoGLMModels live. "
            "Empty: operator.watchNamespaces (watching every namespace, list them here).",
        )
    )


class Runtime(Strict):
    enabled: bool = Field(True, description="Install this ClusterServingRuntime.")
    streamIntervalMs: int = Field(
        0,
        ge=0,
        le=MAX_STREAM_INTERVAL_MS,
        description="Its servers gather streamed tokens and send an event at most this often (autoglm serve --stream-interval-ms; the first token and the end at once). 0: an event per token. On CPU nodes whose every core decodes, each event costs decode time.",
    )


class EdgeRuntime(Runtime):
    cacheHostPath: str = Field(
        "",
        description="Keep artifacts on the edge node's disk at this path across pods (a hostPath volume). Empty: an emptyDir. A hostPath is outside the restricted and baseline Pod Security standards: the serving namespace must then allow privileged pods.",
    )


class Runtimes(Strict):
    cloud: Runtime = Field(
        default_factory=Runtime,
        description="autoglm-server: autoglm serve and the autoglm agent sidecar, for cloud pools.",
    )
    edge: EdgeRuntime = Field(
        default_factory=EdgeRuntime,
        description="autoglm-server-edge: the same for KubeEdge nodes (RawDeployment).",
    )


class Monitor(Strict):
    enabled: bool = Field(True, description="Create it (needs the Prometheus operator's CRDs).")
    interval: str = Field("30s", pattern=r"^[0-9]+(ms|s|m|h)$", description="How often Prometheus scrapes.")
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra labels, e.g. the one your Prometheus selects monitors by (release: kube-prometheus-stack).",
    )


class Monitoring(Strict):
    serviceMonitor: Monitor = Field(
        default_factory=Monitor, description="A ServiceMonitor for the operator's /metrics."
    )
    podMonitor: Monitor = Field(
        default_factory=Monitor,
        description="A PodMonitor for every autoglm serve pod (any namespace): latency, tokens, energy, feedback scores, per revision and variant.",
    )


class Dashboards(Strict):
    enabled: bool = Field(
        True, description="The Grafana dashboards (fleet latency, fleet energy, decisions) as ConfigMaps."
    )
    label: str = Field("grafana_dashboard", description="The label Grafana's dashboard sidecar watches for.")
    labelValue: str = Field("1", description="Its value.")
    folder: str = Field("AutoGLM", description="The Grafana folder (the sidecar's folder annotation).")


class ServiceAccount(Strict):
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Its annotations (e.g. a cloud IAM role for the artifact store)."
    )


class Values(Strict):
    image: Image = Field(default_factory=Image, description="The image every AutoGLM container runs.")
    imagePullSecrets: list[dict[str, str]] = Field(
        default_factory=list, description="Secrets for a private registry, e.g. [{name: regcred}]."
    )
    nameOverride: str = Field("", description="Replaces the chart's name in object names.")
    fullnameOverride: str = Field("", description="Replaces the release-and-chart name of every object.")
    serviceAccount: ServiceAccount = Field(
        default_factory=lambda: ServiceAccount(), description="The operator's ServiceAccount."
    )
    operator: Operator = Field(
        default_factory=Operator, description="The kopf operator: one Deployment, least-privilege RBAC."
    )
    audit: Audit = Field(default_factory=Audit, description="The audit ledger every decision is written to.")
    feedback: Feedback = Field(default_factory=Feedback, description="The feedback loop.")
    pipeline: Pipeline = Field(default_factory=Pipeline, description="The pipeline's pods (Argo Workflows).")
    runtimes: Runtimes = Field(
        default_factory=Runtimes,
        description="KServe ClusterServingRuntimes the InferenceServices the operator creates name.",
    )
    monitoring: Monitoring = Field(default_factory=Monitoring, description="Prometheus-operator monitors.")
    dashboards: Dashboards = Field(default_factory=Dashboards, description="Grafana dashboards.")


def schema() -> dict[str, Any]:
    generated = Values.model_json_schema()
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "autoglm chart values",
        **generated,
    }


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _comment(text: str, indent: str) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(indent) + 2 + len(line) + 1 + len(word) > 100:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return [f"{indent}# {x}" for x in lines]


def _emit(model: BaseModel, indent: str = "") -> list[str]:
    out: list[str] = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if not indent and out:
            out.append("")
        out += _comment(info.description or "", indent)
        if isinstance(value, BaseModel):
            out.append(f"{indent}{name}:")
            out += _emit(value, indent + "  ")
        else:
            out.append(f"{indent}{name}: {_scalar(value)}")
    return out


def values_yaml() -> str:
    header = [
        "# The autoglm chart's values. Generated from tools/chart_values.py by `make chart`: edit that file.",
        "# Helm checks every value against values.schema.json (generated from the same models) at install.",
    ]
    return "\n".join([*header, "", *_emit(Values())]) + "\n"


def schema_json() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"


#: The image in the generated runtimes; the template replaces it with the release's.
IMAGE_PLACEHOLDER = "autoglm-image"


def runtime_yaml(edge: bool) -> str:
    from autoglm_operator.kube.objects import cluster_serving_runtime

    runtime = cluster_serving_runtime(image=IMAGE_PLACEHOLDER, edge=edge)
    header = "# Generated by `make chart` (tools/chart.py) from autoglm_operator.kube.objects. Do not edit.\n"
    return header + yaml.safe_dump(runtime, sort_keys=False)


def generated() -> dict[Path, str]:
    return {
        VALUES: values_yaml(),
        SCHEMA: schema_json(),
        CHART / "files" / "runtimes" / "cloud.yaml": runtime_yaml(edge=False),
        CHART / "files" / "runtimes" / "edge.yaml": runtime_yaml(edge=True),
    }


def main(argv: list[str]) -> int:
    return generated_files.main(argv, generated, "chart", __doc__ or "", None)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
