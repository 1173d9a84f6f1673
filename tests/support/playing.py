"""What a cluster's other parts do, played on the emulated cluster for the operator's tests and the
README's transcript: Argo ending a Workflow with the outputs the WorkflowTemplate exports, and the
agents reporting on their pods what their servers serve."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from autoglm_api.validation import load_manifest
from autoglm_core.revision import source_revision
from autoglm_core.variants import variants
from autoglm_operator.agent.report import ANNOTATION
from autoglm_pipelines.dag import step_name
from autoglm_pipelines.workflow import MANIFEST_PARAMETER, WORKDIR, published_artifact, result_parameter
from tests.support.k8s_emulator import EmulatedCluster


def run_manifest(run: dict[str, Any]) -> Any:
    """The AutoGLMModel a Workflow was submitted for (its ``manifest`` parameter)."""
    text = next(p["value"] for p in run["spec"]["arguments"]["parameters"] if p["name"] == MANIFEST_PARAMETER)
    return model_of(text)


def model_of(manifest: str | dict[str, Any]) -> Any:
    """A manifest (YAML text or a parsed document) as an AutoGLMModel, through ``load_manifest``."""
    text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "manifest.yaml"
        path.write_text(text)
        return load_manifest(str(path))


def succeed(
    cluster: EmulatedCluster,
    run: dict[str, Any],
    *,
    gates: bool = True,
    weight_bytes: int = 10**8,
    baseline: bool = False,
) -> None:
    """End the Workflow as Argo would: per variant the validate report and the publish result as
    global output parameters and the published folder as a global artifact (by its key in the default
    repository); a failed gate fails the Workflow with the validate report still exported.
    ``baseline``: the first variant's publish also published the uncompressed source beside it."""
    model = run_manifest(run)
    first = True
    namespace, name = run["metadata"]["namespace"], run["metadata"]["name"]
    parameters, artifacts = [], []
    for variant in variants(model.spec):
        validate, publish = step_name("validate", variant.name), step_name("publish", variant.name)
        report = {"passed": gates, "gates": [{"name": "maxQualityLoss", "passed": gates}]}
        parameters.append({"name": result_parameter(validate), "value": json.dumps(report)})
        if not gates:
            continue
        result = {
            "step": publish, "status": "Succeeded",
            "metrics": {"artifact": f"{WORKDIR}/{publish}/model", "revision": variant.revision,
                        "artifactBytes": weight_bytes},
        }  # fmt: skip
        if baseline and first:
            result["metrics"].update({"baseline": f"{WORKDIR}/{publish}/baseline", "baselineBytes": weight_bytes,
                                      "baselineRevision": source_revision(model.spec)})  # fmt: skip
        first = False
        parameters.append({"name": result_parameter(publish), "value": json.dumps(result)})
        artifacts.append(
            {"name": published_artifact(variant.name), "s3": {"key": f"{namespace}/{name}/{publish}"}}
        )
    status: dict[str, Any] = {
        "phase": "Succeeded" if gates else "Failed",
        "outputs": {"parameters": parameters, "artifacts": artifacts},
    }
    if not gates:
        status["message"] = "child 'validate' failed"
    done = cluster.kubectl(
        "patch", "workflow", name, "-n", namespace, "--type", "merge", "-p", json.dumps({"status": status})
    )
    assert done.returncode == 0, done.stderr


def report(
    cluster: EmulatedCluster, namespace: str, model: str, target: str, replica: int, served: dict[str, Any]
) -> None:
    """An agent's report on its pod (the pod is created if missing), as ``agent.report`` writes it."""
    labels = {
        "app.kubernetes.io/managed-by": "autoglm",
        "autoglm.io/model": model,
        "autoglm.io/target": target,
    }
    state = {"served": served, "applied": [], "error": None, "generation": 1, "at": time.time()}
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{model}-{target}-predictor-{replica}", "namespace": namespace, "labels": labels,
                     "annotations": {ANNOTATION: json.dumps(state)}},
        "spec": {"containers": [{"name": "kserve-container", "image": "autoglm:0.1.0"}]},
        "status": {"phase": "Running"},
    }  # fmt: skip
    done = cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(pod))
    assert done.returncode == 0, done.stderr
