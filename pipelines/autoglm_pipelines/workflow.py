"""The Argo ``WorkflowTemplate`` of a model's pipeline, built with Hera from the step list in ``dag.py``.

Pure: no network, no cluster, no clock. The operator submits what this builds through its Argo
backend; ``autoglm pipeline render`` prints it. Shape of the template:

- one DAG task per step of :func:`autoglm_pipelines.dag.pipeline_steps`, with its ``depends``;
- one container template per step running ``autoglm pipeline STEP --spec /autoglm/spec.yaml
  --workdir /autoglm/work`` in the given image, with the step's resource requests, retries with
  exponential backoff and ``activeDeadlineSeconds``;
- the manifest travels as the workflow parameter ``manifest`` and is mounted in every step as the raw
  input artifact ``/autoglm/spec.yaml``;
- each step's folder ``/autoglm/work/<step>`` is its output artifact (in the cluster's default
  artifact repository) and is handed to the steps that depend on it at the same path; the publish
  step's folder is also the workflow's global output artifact ``published-model`` (a target
  precision's variant: ``published-model-int4``, from its ``publish-int4`` step), kept unarchived
  (``archive: none``) so the agents can pull the model folder as it is;
- what the operator decides on travels as global output parameters (``status.outputs.parameters``
  of the Workflow, read without touching the artifact repository): each validate step's report
  (``validate-result``, ``validate-int4-result``: its gates and whether they passed; written before
  a failed gate fails the step) and each publish step's result (``publish-result``: the revision,
  where the artifact lies inside the step folder, its weight bytes and files' digests, the baseline);
- labels tie the template, its Workflows and their pods to the model and the artifact revision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import yaml
from hera.workflows import (
    DAG,
    Artifact,
    Container,
    EmptyDirVolume,
    ExistingVolume,
    Parameter,
    RawArtifact,
    Resources,
    RetryPolicy,
    RetryStrategy,
    Task,
    WorkflowTemplate,
)
from hera.workflows.models import (
    ArchiveStrategy,
    Backoff,
    Capabilities,
    Metadata,
    NoneStrategy,
    PodSecurityContext,
    SeccompProfile,
    SecurityContext,
    ValueFrom,
    WorkflowMetadata,
)

from autoglm_api.resource import AutoGLMModel
from autoglm_core.revision import artifact_revision
from autoglm_core.uris import DEFAULT_PVC_ROOT
from autoglm_pipelines.dag import EXIT_TRANSIENT, Step, pipeline_steps
from autoglm_pipelines.results import RESULT_FILE, VALIDATE_REPORT

# The image built from this repository; clusters set their registry's reference with --image.
DEFAULT_IMAGE = "autoglm:0.1.0"

#: The image's user (the Dockerfile's ``USER``): a number, so ``runAsNonRoot`` can be checked.
IMAGE_UID = 10001
#: The ServiceAccount the steps' pods run as: Argo's executor reports each step's outputs through it
#: (``workflowtaskresults``); the chart creates it, with only that, in each namespace it serves.
DEFAULT_PIPELINE_SERVICE_ACCOUNT = "autoglm-pipeline"
#: Scratch space of a read-only root filesystem (the image's $HOME and caches).
TMP_VOLUME, TMP_PATH = "tmp", "/tmp"
SPEC_PATH = "/autoglm/spec.yaml"
WORKDIR = "/autoglm/work"
ENTRYPOINT = "pipeline"
MANIFEST_PARAMETER = "manifest"
SPEC_ARTIFACT = "spec"
WORK_VOLUME = "work"
PUBLISH_STEP = "publish"
#: The publish step's folder as a workflow output (``status.outputs.artifacts``), for the operator.
PUBLISHED_ARTIFACT = "published-model"
VALIDATE_STEP = "validate"
#: A step's output parameter (and, with the step's name before it, the workflow's global one).
RESULT_PARAMETER = "result"

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MODEL_LABEL = "autoglm.io/model"
REVISION_LABEL = "autoglm.io/revision"
STEP_LABEL = "autoglm.io/step"
DESCRIPTION_ANNOTATION = "workflows.argoproj.io/description"  # shown by the Argo UI

#: The spec parts that change the built artifact; targets, rollout and feedback do not.

BACKOFF_SECONDS = 10
BACKOFF_FACTOR = 2
#: Retried: what the infrastructure broke (status Error: a pod deleted under the step by a lost or
#: preempted node, a failed artifact upload or download, a controller error) and a step's own
#: transient failure, which it signals with exit status 75 (EX_TEMPFAIL: a download that failed).
#: Any other non-zero exit (a corrupt checkpoint, a failed gate) is a verdict and is not retried,
#: so no GPU hours are burnt repeating it. OnTransientError alone would match only Argo's list of
#: network and API-server messages, missing both a deleted pod and a step's own exit status.
RETRY_POLICY = RetryPolicy.always
RETRY_EXPRESSION = f'lastRetry.status == "Error" || lastRetry.exitCode == "{EXIT_TRANSIENT}"'


def published_artifact(variant: str = "") -> str:
    """The workflow output artifact of a variant's published folder."""
    return f"{PUBLISHED_ARTIFACT}-{variant}" if variant else PUBLISHED_ARTIFACT


def result_parameter(step: str) -> str:
    """The workflow's global output parameter of a validate or publish step (``validate-int4-result``)."""
    return f"{step}-{RESULT_PARAMETER}"


def template_name(model: AutoGLMModel) -> str:
    """``autoglm-<model name>``: one WorkflowTemplate per model, updated in place per revision."""
    if not model.metadata.name:
        raise ValueError("metadata.name is required to render a pipeline (generateName is not resolved yet)")
    return f"autoglm-{model.metadata.name}"


def pipeline_manifest(model: AutoGLMModel) -> dict[str, Any]:
    """The manifest the steps read: apiVersion, kind, name, namespace and the spec with its defaults.

    Server-set metadata (uid, resourceVersion, managedFields, ...) and status are left out, so the
    rendered template changes only when the spec does.
    """
    data = model.to_json()
    metadata = {k: v for k, v in data["metadata"].items() if k in ("name", "namespace")}
    return {
        "apiVersion": data["apiVersion"],
        "kind": data["kind"],
        "metadata": metadata,
        "spec": data["spec"],
    }


def retry_budget_seconds(step: Step) -> int:
    """The longest a step can take: every attempt to its deadline, plus the backoff waits between them."""
    waits, wait = 0, BACKOFF_SECONDS
    for _ in range(step.retries):  # Argo waits duration * factor**n before retry n + 1
        waits, wait = waits + wait, wait * BACKOFF_FACTOR
    return (step.retries + 1) * step.timeout_seconds + waits


def workflow_deadline_seconds(steps: tuple[Step, ...]) -> int:
    """A bound on the whole run: the sum of the steps' retry budgets.

    The DAG is a chain today, so this is its critical path; for a wider DAG it still bounds the
    run, and leaves room for steps that wait for a node.
    """
    return sum(retry_budget_seconds(step) for step in steps)


def go_duration(seconds: int) -> str:
    """``10830`` -> ``"3h30s"``: a Go duration string, as Argo's backoff fields take them."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = "".join(f"{value}{unit}" for value, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if value)
    return text or "0s"


def _retry_strategy(step: Step) -> RetryStrategy | None:
    if step.retries == 0:
        return None
    # Argo measures backoff.maxDuration from the start of the FIRST attempt and gives up (or cuts
    # the retry's deadline) once it has passed, so a fixed short bound would stop any step that
    # fails after running longer than it from ever being retried. The step's whole retry budget
    # lets every attempt run to its own deadline.
    return RetryStrategy(
        limit=step.retries,
        retry_policy=RETRY_POLICY,
        expression=RETRY_EXPRESSION,
        backoff=Backoff(
            duration=f"{BACKOFF_SECONDS}s",
            factor=BACKOFF_FACTOR,
            max_duration=go_duration(retry_budget_seconds(step)),
        ),
    )


def _resources(step: Step) -> Resources:
    # Memory limit = request: a step past its memory is OOM-killed in its own container at a known
    # size, instead of the node evicting whichever pod is largest under pressure.
    return Resources(
        cpu_request=step.cpu,
        memory_request=step.memory,
        memory_limit=step.memory,
        gpus=step.gpu or None,  # nvidia.com/gpu, as request and limit (extended resources need both)
    )


def pvc_claims(model: AutoGLMModel) -> list[str]:
    """The PersistentVolumeClaims the spec's ``pvc://CLAIM/PATH`` URIs name (source, datasets, a
    fine-tune's dataset and the artifact it is judged against): each step mounts them read-only where ``autoglm_core.uris`` resolves them."""
    spec = model.spec
    uris = [spec.source.uri, spec.calibration.dataset, spec.validation.dataset]
    if spec.training is not None:
        uris += [spec.training.dataset, *([spec.training.against] if spec.training.against else [])]
    return sorted({urlparse(u).netloc for u in uris if u.startswith("pvc://") and urlparse(u).netloc})


def _pvc_volumes(model: AutoGLMModel) -> list[ExistingVolume]:
    return [
        ExistingVolume(name=f"pvc-{claim}"[:63].rstrip("-"), claim_name=claim, mount_path=f"{DEFAULT_PVC_ROOT}/{claim}",
                       read_only=True)
        for claim in pvc_claims(model)
    ]  # fmt: skip


def _restricted() -> SecurityContext:
    """The ``restricted`` Pod Security standard for a step's container, with a read-only root."""
    return SecurityContext(
        allow_privilege_escalation=False, read_only_root_filesystem=True, run_as_non_root=True,
        run_as_user=IMAGE_UID, run_as_group=IMAGE_UID, capabilities=Capabilities(drop=["ALL"]),
        seccomp_profile=SeccompProfile(type="RuntimeDefault"),
    )  # fmt: skip


def _container(
    step: Step, image: str, volume: EmptyDirVolume, claims: Sequence[ExistingVolume] = ()
) -> Container:
    inputs: list[Artifact] = [
        # A reference to the parameter, not the manifest pasted into every template: one copy, and
        # its text (a "{{" in a prompt) stays out of the templates Argo parses for {{...}} tags.
        RawArtifact(
            name=SPEC_ARTIFACT, path=SPEC_PATH, data=f"{{{{workflow.parameters.{MANIFEST_PARAMETER}}}}}"
        )
    ]
    inputs += [Artifact(name=dep, path=f"{WORKDIR}/{dep}") for dep in step.depends]
    publish = step.function == PUBLISH_STEP
    output = Artifact(
        name=step.name,
        path=f"{WORKDIR}/{step.name}",
        global_name=published_artifact(step.variant) if publish else None,
        archive=ArchiveStrategy(none=NoneStrategy()) if publish else None,
    )
    results = {PUBLISH_STEP: RESULT_FILE, VALIDATE_STEP: VALIDATE_REPORT}
    parameters = [
        Parameter(
            name=RESULT_PARAMETER,
            value_from=ValueFrom(path=f"{WORKDIR}/{step.name}/{results[step.function]}", default="{}"),
            global_name=result_parameter(step.name),
        )
    ] if step.function in results else []  # fmt: skip
    variant = ["--variant", step.variant] if step.variant else []
    return Container(
        name=step.name,
        image=image,
        command=["autoglm", "pipeline", step.function, *variant, "--spec", SPEC_PATH, "--workdir", WORKDIR],
        inputs=inputs,
        outputs=[output, *parameters],
        resources=_resources(step),
        volumes=[volume, EmptyDirVolume(name=TMP_VOLUME, mount_path=TMP_PATH), *claims],
        security_context=_restricted(),
        retry_strategy=_retry_strategy(step),
        active_deadline_seconds=step.timeout_seconds,
        labels={STEP_LABEL: step.name},
    )


def _task(step: Step) -> Task:
    return Task(
        name=step.name,
        template=step.name,
        depends=" && ".join(step.depends) or None,
        arguments=[
            Artifact(name=dep, from_=f"{{{{tasks.{dep}.outputs.artifacts.{dep}}}}}") for dep in step.depends
        ]
        or None,
    )


def build_workflow_template(
    model: AutoGLMModel,
    *,
    image: str = DEFAULT_IMAGE,
    revision: str | None = None,
    service_account: str = DEFAULT_PIPELINE_SERVICE_ACCOUNT,
) -> WorkflowTemplate:
    """The model's pipeline as a Hera ``WorkflowTemplate``; ``revision`` defaults to :func:`artifact_revision`.
    Its pods run as ``service_account``, non-root, with read-only root filesystems."""
    name = template_name(model)
    revision = revision or artifact_revision(model.spec)
    steps = pipeline_steps(model.spec)
    labels = {MANAGED_BY_LABEL: "autoglm", MODEL_LABEL: str(model.metadata.name), REVISION_LABEL: revision}
    description = (
        f"AutoGLM pipeline of AutoGLMModel {model.metadata.name} at revision {revision}: "
        + " -> ".join(step.name for step in steps)
    )
    # The working directory lives on the node's ephemeral storage, not in the container's writable
    # layer: checkpoints are gigabytes. Input artifacts under it are loaded into this volume by Argo.
    work = EmptyDirVolume(name=WORK_VOLUME, mount_path=WORKDIR)
    claims = _pvc_volumes(model)  # every step mounts them
    manifest = yaml.safe_dump(pipeline_manifest(model), sort_keys=False, allow_unicode=True)
    return WorkflowTemplate(
        name=name,
        namespace=model.metadata.namespace,
        labels=labels,
        annotations={DESCRIPTION_ANNOTATION: description},
        entrypoint=ENTRYPOINT,
        service_account_name=service_account,
        security_context=PodSecurityContext(
            run_as_non_root=True, fs_group=IMAGE_UID, seccomp_profile=SeccompProfile(type="RuntimeDefault")
        ),
        active_deadline_seconds=workflow_deadline_seconds(steps),
        arguments=[
            Parameter(
                name=MANIFEST_PARAMETER,
                value=manifest,
                description=f"The AutoGLMModel manifest at revision {revision}, mounted at {SPEC_PATH}",
            )
        ],
        workflow_metadata=WorkflowMetadata(labels=dict(labels)),
        pod_metadata=Metadata(labels=dict(labels)),
        templates=[
            DAG(name=ENTRYPOINT, tasks=[_task(step) for step in steps]),
            *(_container(step, image, work, claims) for step in steps),
        ],
    )


def render_yaml(model: AutoGLMModel, *, image: str = DEFAULT_IMAGE, revision: str | None = None) -> str:
    """The WorkflowTemplate as stable YAML (Hera's key order), for ``kubectl apply`` and committed examples."""
    return build_workflow_template(model, image=image, revision=revision).to_yaml()
