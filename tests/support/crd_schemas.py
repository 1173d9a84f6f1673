"""The upstream CRD schemas in ``../shared/schemas`` (KServe, Argo, ...): validate what we generate
against the real ``openAPIV3Schema`` of the served version, without a cluster.

``problems`` is jsonschema's validation plus what an API server would do silently: a field the
schema does not declare (under properties without ``x-kubernetes-preserve-unknown-fields``) is
pruned on write, so an object that names one does not say what we meant. Each file is large (2-3
MB) and is read once per session.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMAS = Path(__file__).resolve().parents[2].parent / "shared" / "schemas"

#: (apiVersion, kind) -> the file holding its CRD.
FILES = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "kserve.serving.kserve.io_inferenceservices.yaml",
    (
        "serving.kserve.io/v1alpha1",
        "ClusterServingRuntime",
    ): "kserve.serving.kserve.io_clusterservingruntimes.yaml",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "kserve.serving.kserve.io_servingruntimes.yaml",
    ("argoproj.io/v1alpha1", "Workflow"): "argo-workflows.argoproj.io_workflows.yaml",
    ("argoproj.io/v1alpha1", "WorkflowTemplate"): "argo-workflows.argoproj.io_workflowtemplates.yaml",
    (
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
    ): "prometheus-operator.monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-operator.monitoring.coreos.com_podmonitors.yaml",
    ("argoproj.io/v1alpha1", "Application"): "argo-cd.application-crd.yaml",
    (
        "kustomize.toolkit.fluxcd.io/v1",
        "Kustomization",
    ): "flux.kustomize.toolkit.fluxcd.io_kustomizations.yaml",
}


@functools.cache
def schema_of(api_version: str, kind: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the upstream CRDs are megabytes
    crd = yaml.load((SCHEMAS / FILES[(api_version, kind)]).read_text(), Loader=loader)
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    assert crd["spec"]["names"]["kind"] == kind
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            return served["schema"]["openAPIV3Schema"]
    raise KeyError(f"{api_version} {kind}: no such version in {FILES[(api_version, kind)]}")


def _unknown(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                found += _unknown(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += _unknown(item, extra, f"{path}.{key}")
            elif properties is not None and path != "$.metadata":  # metadata is the API server's
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += _unknown(item, schema["items"], f"{path}[{index}]")
    return found


def problems(obj: dict[str, Any]) -> list[str]:
    """Why the API server would refuse ``obj`` or drop part of it; empty when it takes it as is."""
    schema = schema_of(obj["apiVersion"], obj["kind"])
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '$'}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(obj)
    ]
    return errors + [f"{p}: not in the schema (the API server prunes it)" for p in _unknown(obj, schema, "$")]
