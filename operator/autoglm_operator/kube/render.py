"""Every object the operator creates for a model, as one YAML stream: ``autoglm objects MANIFEST``.

For the model's current spec: the pipeline's WorkflowTemplate, the Workflow of its first run, and per
target the InferenceService and the agents' ConfigMap as they are once the run has published each
target's revision (at ``--artifact-uri``, a template of the artifact repository's layout), then the
two ClusterServingRuntimes the chart ships. ``make render`` writes the examples' streams to
``examples/rendered/``, which ``tests/unit/test_kube_objects.py`` compares and validates against the
upstream CRD schemas.
"""

from __future__ import annotations

from typing import Any

import yaml

from autoglm_api.resource import AutoGLMModel
from autoglm_core.variants import rollout_revision, target_revisions
from autoglm_operator.agent.desired import Assignment, Desired
from autoglm_operator.kube import DEFAULT_ARTIFACT_URI
from autoglm_operator.kube.objects import (
    agent_config,
    cluster_serving_runtime,
    inference_service,
    workflow,
)
from autoglm_pipelines.workflow import DEFAULT_IMAGE, build_workflow_template


def cluster_objects(
    model: AutoGLMModel, *, image: str = DEFAULT_IMAGE, artifact_uri: str = DEFAULT_ARTIFACT_URI
) -> list[dict[str, Any]]:
    revisions = target_revisions(model.spec)
    objects: list[dict[str, Any]] = [
        build_workflow_template(model, image=image).to_dict(),
        workflow(model, rollout_revision(model.spec), baseline=True),
    ]
    for target in model.spec.targets:
        revision = revisions[target.name]
        uri = artifact_uri.format(
            namespace=model.metadata.namespace, model=model.metadata.name, revision=revision
        )
        # The first desired state the operator writes (generation 1).
        desired = Desired(stable=Assignment(revision=revision, uri=uri), generation=1)
        objects.append(inference_service(model, target, desired))
        objects.append(agent_config(model, target, desired))
    objects.append(cluster_serving_runtime(image=image, edge=False))
    objects.append(cluster_serving_runtime(image=image, edge=True))
    return objects


def render_yaml(model: AutoGLMModel, **options: Any) -> str:
    return yaml.safe_dump_all(cluster_objects(model, **options), sort_keys=False, allow_unicode=True)
