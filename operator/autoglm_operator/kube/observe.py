"""What the operator observes in a cluster, as the core's terms. Pure: objects in, ``plan`` inputs out.

- ``pipeline_run(workflow, ...)``: an Argo ``Workflow`` (its phase, and the validate and publish
  results the template exports as global output parameters) as a :class:`PipelineRun`. The artifact
  URIs come from the workflow's output artifacts (``published-model``, ``published-model-int4``):
  their location as Argo reports it (an S3 bucket and key), or a key under the operator's
  ``--artifact-repository`` where Argo reports only the key (the cluster's default repository);
- ``target_serving(pods)``: what a target serves, from the reports its agents write on their pods
  (``autoglm.io/served``): a revision counts as the canary only when every live replica reports it,
  so weight never moves onto a candidate that some replica has not loaded;
- ``intents(body)``: the manual intents a person set as annotations (``autoglm.io/promote``,
  ``autoglm.io/abort``, ``autoglm.io/retry``), with who asked (the annotation's value, as the ledger's
  ``user:<name>``: ``kubectl annotate agm NAME autoglm.io/promote=$USER``) and when (the
  time of the managed-fields entry that set it, so the same annotation read twice is one intent).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, cast

from autoglm_operator.agent.report import ANNOTATION as SERVED_ANNOTATION
from autoglm_operator.plan import Intent, IntentKind, PipelineRun, Published, Serving
from autoglm_pipelines.dag import step_name
from autoglm_pipelines.workflow import WORKDIR, published_artifact, result_parameter

INTENT_PREFIX = "autoglm.io/"
INTENT_KINDS: tuple[IntentKind, ...] = ("promote", "abort", "retry")
#: Annotation values that name no one (``kubectl annotate agm m autoglm.io/promote=true``).
ANONYMOUS = ("", "true", "yes", "1")

_RUNNING = ("", "Pending", "Running")
_FAILED = ("Failed", "Error")


def _parameters(workflow: dict[str, Any]) -> dict[str, Any]:
    """The workflow's global output parameters, each parsed as JSON (None where it is not)."""
    found: dict[str, Any] = {}
    for item in (workflow.get("status") or {}).get("outputs", {}).get("parameters") or []:
        try:
            found[str(item.get("name"))] = json.loads(item.get("value") or "null")
        except ValueError:
            found[str(item.get("name"))] = None
    return found


def _artifact_base(workflow: dict[str, Any], name: str, repository: str) -> str | None:
    """Where the output artifact ``name`` lies: ``s3://bucket/key`` (or gcs) when Argo reports the
    bucket, else the key under ``repository``."""
    for item in (workflow.get("status") or {}).get("outputs", {}).get("artifacts") or []:
        if item.get("name") != name:
            continue
        for scheme, store in (("s3", "s3"), ("gs", "gcs")):
            location = item.get(store) or {}
            key = str(location.get("key", "")).strip("/")
            if not key:
                continue
            if location.get("bucket"):
                return f"{scheme}://{location['bucket']}/{key}"
            return f"{repository.rstrip('/')}/{key}"
    return None


def _inside(path: Any, folder: str) -> str | None:
    """``path`` (a path in the step's pod) relative to the step's folder, or None outside it."""
    try:
        return str(PurePosixPath(str(path)).relative_to(folder))
    except ValueError:
        return None


def pipeline_run(
    workflow: dict[str, Any] | None, *, variants: list[str], repository: str
) -> PipelineRun | None:
    """The run a Workflow is, for the revision it builds (its ``autoglm.io/revision`` label).

    ``variants``: the names of the variants the run builds ("" first, the spec's own).
    """
    if workflow is None:
        return None
    meta = workflow.get("metadata") or {}
    labels = meta.get("labels") or {}
    revision = str(labels.get("autoglm.io/revision", ""))
    try:
        attempt = int(labels.get("autoglm.io/attempt", 1))
    except ValueError:
        attempt = 1
    status = workflow.get("status") or {}
    phase = str(status.get("phase") or "")
    if phase in _RUNNING:
        return PipelineRun(revision, "Running", attempt=attempt)
    outputs = _parameters(workflow)
    for name in variants:
        report = outputs.get(result_parameter(step_name("validate", name)))
        if isinstance(report, dict) and report.get("passed") is False:
            failed = [g.get("name") for g in report.get("gates", []) if not g.get("passed")]
            variant = f" (variant {name})" if name else ""
            reason = f"gate failed{variant}: " + ", ".join(str(f) for f in failed)
            return PipelineRun(revision, "Succeeded", gates_passed=False, reason=reason, attempt=attempt)
    if phase in _FAILED:
        message = str(status.get("message") or "the workflow failed")
        return PipelineRun(
            revision, "Failed", reason=f"workflow {meta.get('name')}: {message}", attempt=attempt
        )
    published: list[Published] = []
    first: dict[str, Any] = {}
    first_base = ""
    for name in variants:
        step = step_name("publish", name)
        result = outputs.get(result_parameter(step))
        base = _artifact_base(workflow, published_artifact(name), repository)
        metrics = result.get("metrics", {}) if isinstance(result, dict) else {}
        inside = _inside(metrics.get("artifact", ""), f"{WORKDIR}/{step}")
        if not isinstance(result, dict) or result.get("status") != "Succeeded" or base is None or not inside:
            why = (
                f"output artifact {published_artifact(name)} is missing"
                if base is None
                else f"output parameter {result_parameter(step)} has no published artifact in {WORKDIR}/{step}"
            )
            return PipelineRun(
                revision, "Failed", reason=f"workflow {meta.get('name')} succeeded but {why}", attempt=attempt
            )
        published.append(
            Published(str(metrics.get("revision", "")), f"{base}/{inside}", metrics.get("artifactBytes"))
        )
        if not first:
            first, first_base = metrics, base
    baseline = None
    inside = _inside(first.get("baseline", ""), f"{WORKDIR}/{step_name('publish', variants[0])}")
    if first.get("baselineRevision") and inside:
        baseline = Published(
            str(first["baselineRevision"]), f"{first_base}/{inside}", first.get("baselineBytes")
        )
    return PipelineRun(
        revision, "Succeeded", gates_passed=True, artifact_uri=published[0].uri, attempt=attempt,
        artifact_bytes=published[0].weight_bytes, baseline=baseline, variants=tuple(published),
    )  # fmt: skip


def _report(pod: dict[str, Any]) -> dict[str, Any] | None:
    text = ((pod.get("metadata") or {}).get("annotations") or {}).get(SERVED_ANNOTATION)
    try:
        report = json.loads(text) if text else None
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def live(pod: dict[str, Any]) -> bool:
    """A replica that counts: not being deleted, not finished."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    return not meta.get("deletionTimestamp") and status.get("phase") not in ("Succeeded", "Failed")


def target_serving(pods: list[dict[str, Any]]) -> tuple[Serving, int]:
    """What every live replica of a target serves, and how many replicas report serving.

    stable: the revision every reporting replica has as stable (None if they differ or none report);
    canary: the candidate only if every live replica reports it loaded, at the lowest weight any of
    them has.
    """
    replicas = [p for p in pods if live(p)]
    served = []
    for pod in replicas:
        report = _report(pod)
        state = report.get("served") if report else None
        served.append(state if isinstance(state, dict) else None)
    reported = [s for s in served if s is not None]
    stables = {s.get("stable") for s in reported}
    stable = cast(str, next(iter(stables))) if len(stables) == 1 and None not in stables else None
    canaries = {s.get("canary") for s in reported} if served and len(reported) == len(served) else {None}
    canary = cast(str, next(iter(canaries))) if len(canaries) == 1 else None
    weight = min(int(s.get("weight") or 0) for s in reported) if canary else 0
    ready = sum(1 for s in reported if s.get("stable"))
    return Serving(stable=stable, canary=canary, weight=weight), ready


def _annotation_time(body: dict[str, Any], key: str) -> datetime | None:
    """When the annotation ``key`` was last set: its managed-fields entry's time."""
    for entry in (body.get("metadata") or {}).get("managedFields") or []:
        annotations = ((entry.get("fieldsV1") or {}).get("f:metadata") or {}).get("f:annotations") or {}
        if f"f:{key}" in annotations and entry.get("time"):
            return datetime.fromisoformat(str(entry["time"]).replace("Z", "+00:00"))
    return None


def intents(body: dict[str, Any], now: datetime) -> list[tuple[str, Intent]]:
    """Each intent annotation on the model (its key, the intent), oldest first."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    found = []
    for kind in INTENT_KINDS:
        key = f"{INTENT_PREFIX}{kind}"
        if key not in annotations:
            continue
        value = "-".join(str(annotations[key]).split())[:253]  # the ledger's user:<name> has no spaces
        actor = f"user:{'unknown' if value.lower() in ANONYMOUS else value}"
        at = _annotation_time(body, key) or now
        found.append((key, Intent(kind, actor=actor, at=at.astimezone(UTC))))
    return sorted(found, key=lambda item: item[1].at)
