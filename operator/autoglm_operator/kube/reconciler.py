"""One reconcile of an AutoGLMModel in a cluster: the core's ``plan()`` between the cluster's I/O.

``ClusterReconciler.reconcile(namespace, name)`` reads the model fresh, observes (the Workflow of
the revision being built and its outputs, each target's ConfigMap and the reports its agents wrote
on their pods, the canary's figures through Prometheus, the intent annotations), plans, acts (a
Workflow from the model's WorkflowTemplate; per target the desired state in its ConfigMap and the
InferenceService that serves it), appends the decisions to the ledger (each under its idempotency
key) with a Kubernetes Event each, writes the status with ``observedGeneration`` and conditions
through the status subresource, and removes the intents it handled. Every API call goes through
``kube.gateway``. Reconciles of one model are serialised; a restart reads everything from the cluster
again (a Workflow submitted twice is a 409, a decision recorded twice is one ledger row).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from autoglm_api.conditions import (
    CANARY_PROGRESSING,
    COMPRESSED,
    GATES_FAILED,
    GATES_PASSED,
    INVALID_SPEC,
    PIPELINE_FAILED,
    PIPELINE_RUNNING,
    PROMOTED,
    READY,
    ROLLED_BACK,
    ROLLED_OUT,
    VALIDATED,
    set_condition,
)
from autoglm_api.resource import AutoGLMModel
from autoglm_api.spec import Target
from autoglm_api.status import AutoGLMModelStatus, Condition, ConditionStatus, Decision
from autoglm_api.validation import validate_document
from autoglm_core.audit import Ledger
from autoglm_core.audit.ledger import resolve_url
from autoglm_core.variants import rollout_revision, variants
from autoglm_operator.agent.desired import Desired, DesiredStateError
from autoglm_operator.analysis import CanaryAnalyst
from autoglm_operator.feedback_loop import VARIANTS_KEY, FeedbackLoop, chat_answer, variants_document
from autoglm_operator.kube import DEFAULT_ARTIFACT_REPOSITORY, DEFAULT_TARGET_SELECTOR, telemetry
from autoglm_operator.kube.gateway import Gateway
from autoglm_operator.kube.objects import (
    AGENT_CONFIG_KEY,
    ATTEMPT_LABEL,
    TARGET_LABEL,
    agent_config,
    agent_config_name,
    inference_service,
    inference_service_name,
    owner_references,
    to_dict,
    workflow,
)
from autoglm_operator.kube.observe import intents, pipeline_run, target_serving
from autoglm_operator.kube.serving import ServingActionError, desired_after
from autoglm_operator.metrics import FiguresSource
from autoglm_operator.plan import Action, Observed, PipelineRun, Plan, TargetObserved, plan
from autoglm_operator.promql import PrometheusSource
from autoglm_operator.retraining import effective
from autoglm_pipelines.workflow import (
    DEFAULT_IMAGE,
    DEFAULT_PIPELINE_SERVICE_ACCOUNT,
    MANIFEST_PARAMETER,
    MODEL_LABEL,
    REVISION_LABEL,
    build_workflow_template,
)

log = logging.getLogger(__name__)

#: Decisions that are told as Warning Events (the others are Normal).
WARNINGS = {"GateFailed", "PipelineFailed", "RolledBack", "CanaryIntervalFailed"}
#: How long a reconcile waits for the served model's OPRO proposal (it holds the model's lock).
PROPOSAL_TIMEOUT_S = 60.0


@dataclass
class ClusterOptions:
    image: str = DEFAULT_IMAGE
    #: Where Argo's default artifact repository keeps output artifacts (keys are under it).
    artifact_repository: str = DEFAULT_ARTIFACT_REPOSITORY
    #: The ledger's database (None: ``$AUTOGLM_AUDIT_URL``, else the ledger's default).
    audit_url: str | None = None
    #: The Prometheus HTTP API that scrapes the servers (None: canaries hold, Inconclusive).
    prometheus_url: str | None = None
    target_selector: str = DEFAULT_TARGET_SELECTOR
    #: The feedback store the servers log to (None: no feedback loop; the servers' prompts stay as the
    #: spec's variants, equally shared).
    feedback_url: str | None = None
    #: The Feast repository's local files (registry, offline parquet; the SQLite online store unless
    #: ``online_store`` names Redis or PostgreSQL).
    feast_dir: Path = Path("/var/lib/autoglm/feast")
    online_store: str = "sqlite"
    #: Where retraining datasets go (``pvc://CLAIM/PATH``: written through the operator's mount of the
    #: claim, read by the pipeline's steps, which mount it). None: no retraining revisions.
    retraining_datasets: str | None = None
    #: The ServiceAccount the pipeline's pods run as (in the model's namespace).
    pipeline_service_account: str = DEFAULT_PIPELINE_SERVICE_ACCOUNT
    #: OPRO: ask each model's first target (its InferenceService's cluster-local address) for new
    #: system prompts, which join the bandit as arms. Needs ``feedback_url``.
    propose_prompts: bool = False


def merge_diff(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new`` (removed keys as null)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif old[key] != value:
            patch[key] = merge_diff(old[key], value)
    return patch


def overlay_diff(old: Any, new: Any) -> Any:
    """The merge patch that sets every field of ``new`` on ``old`` and removes nothing: fields others
    own (KServe's defaults, another controller's labels) stay; None when nothing differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        patch = {}
        for key, value in new.items():
            if key not in old:
                patch[key] = copy.deepcopy(value)
                continue
            changed = overlay_diff(old[key], value)
            if changed is not None:
                patch[key] = changed
        return patch or None
    return None if old == new else copy.deepcopy(new)


def conditions(
    status: AutoGLMModelStatus, run: PipelineRun | None, desired: str, ready: dict[str, int], now: datetime
) -> list[Condition]:
    """The standard conditions of ``status`` after a reconcile (``lastTransitionTime`` kept where a
    condition's status did not change)."""
    result = list(status.conditions)
    generation = status.observed_generation

    def put(type_: str, value: ConditionStatus, reason: str, message: str) -> None:
        nonlocal result
        result, _ = set_condition(
            result, type_, value, reason, message, now=now, observed_generation=generation
        )

    if run is not None and run.revision == desired:
        if run.phase == "Running":
            put(
                COMPRESSED,
                "Unknown",
                PIPELINE_RUNNING,
                f"the pipeline of {run.revision} runs (attempt {run.attempt})",
            )
        elif run.phase == "Failed":
            put(COMPRESSED, "False", PIPELINE_FAILED, run.reason or "the pipeline failed")
        else:
            put(COMPRESSED, "True", "PipelineSucceeded", f"{run.revision} was built")
            if run.gates_passed:
                put(VALIDATED, "True", GATES_PASSED, f"{run.revision} passed its gates")
            else:
                put(VALIDATED, "False", GATES_FAILED, run.reason or "a gate failed")
    revisions = status.revisions
    if revisions.stable == desired and revisions.candidate is None:
        put(ROLLED_OUT, "True", PROMOTED, f"{desired} serves every target")
    elif revisions.rejected == desired:
        put(
            ROLLED_OUT,
            "False",
            ROLLED_BACK,
            f"{desired} was rejected; {revisions.stable or 'nothing'} serves",
        )
    elif status.canary.step is not None:
        put(
            ROLLED_OUT,
            "False",
            CANARY_PROGRESSING,
            f"canary step {status.canary.step} at {status.canary.weight}%",
        )
    elif revisions.candidate is not None:
        put(ROLLED_OUT, "False", PIPELINE_RUNNING, f"{revisions.candidate} is being built")
    missing = sorted(t for t, n in ready.items() if n == 0)
    if missing:
        put(READY, "False", "ReplicasNotReady", "no replica reports serving on: " + ", ".join(missing))
    else:
        put(READY, "True", "Serving", "every target has a replica serving")
    return result


@dataclass
class _Seen:
    """What one reconcile read, besides ``Observed``: to act and write the status from."""

    run: PipelineRun | None = None
    desired: dict[str, Desired | None] = field(default_factory=dict)
    config_maps: dict[str, bool] = field(default_factory=dict)
    #: Each target's InferenceService as the API server has it (None: not created yet).
    services: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    ready: dict[str, int] = field(default_factory=dict)
    intent_keys: list[str] = field(default_factory=list)
    #: Each target's ConfigMap's prompt-variants document (None: the key or the ConfigMap is missing).
    variants: dict[str, str | None] = field(default_factory=dict)


class ClusterReconciler:
    def __init__(
        self,
        gateway: Gateway,
        options: ClusterOptions | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.gateway = gateway
        self.options = options or ClusterOptions()
        self.clock = clock
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._analysts: dict[tuple[str, str], CanaryAnalyst] = {}
        self._ledger = Ledger(resolve_url(self.options.audit_url, os.environ))
        self._ledger_lock = threading.Lock()
        self.feedback: FeedbackLoop | None = None
        if self.options.feedback_url:
            self.feedback = FeedbackLoop(
                self.options.feast_dir, url=self.options.feedback_url, feast_dir=self.options.feast_dir,
                online_store=self.options.online_store, say=log.info, datasets=self.options.retraining_datasets,
                ask=self._ask if self.options.propose_prompts else None,
            )  # fmt: skip

    def close(self) -> None:
        self._ledger.close()

    def _ask(self, model: AutoGLMModel, messages: list[dict[str, str]]) -> str:
        """The answer of ``model``'s first target to ``messages`` (an OPRO meta-prompt), asked at its
        InferenceService's cluster-local address (``status.address.url``, else ``status.url``, as
        KServe reports them), by the name the server serves it as (the InferenceService's)."""
        namespace, target = model.metadata.namespace or "default", model.spec.targets[0].name
        name = inference_service_name(model, target)
        found = self.gateway.get("InferenceService", namespace, name) or {}
        status = found.get("status") or {}
        url = (status.get("address") or {}).get("url") or status.get("url")
        if not url:
            raise RuntimeError(f"InferenceService {namespace}/{name} reports no address yet")
        return chat_answer(url, name, messages, timeout=PROPOSAL_TIMEOUT_S)

    def _lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(key, threading.Lock())

    # -- one reconcile -----------------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str) -> Plan | None:
        """Reconcile the model once; None when it is gone, being deleted or invalid."""
        outcome = "error"
        try:
            with telemetry.RECONCILE_SECONDS.time():
                result = self._reconcile(namespace, name)
            outcome = "ok" if result is not None else "skipped"
            return result
        finally:
            telemetry.RECONCILES.labels(outcome).inc()

    def _reconcile(self, namespace: str, name: str) -> Plan | None:
        with self._lock((namespace, name)):
            body = self.gateway.get_model(namespace, name)
            if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
                return None
            now = self.clock()
            manifest = self._parse(body, now)
            if manifest is None:
                return None
            model = effective(manifest)  # a retraining revision's fine-tune (status.retraining) added
            observed, seen = self.observe(model, body, now)
            result = plan(model, observed, now)
            if self.feedback is not None:
                status, records = self.feedback.decide(model, result.status, now)
                status, retrained = self.feedback.retrain(
                    manifest, status, now, _stable_artifact(model, seen)
                )
                result = dataclasses.replace(
                    result, status=status, decisions=(*result.decisions, *records, *retrained)
                )
            self.act(model, result, seen)
            self.record(model, body, result, seen, now)
            return result

    def _parse(self, body: dict[str, Any], now: datetime) -> AutoGLMModel | None:
        """The model with its status; None (an Event and a condition say why) when the spec is invalid
        (the CRD's schema lets through what only our rules catch) or the status unreadable."""
        checked = validate_document(body)
        meta = body["metadata"]
        if checked.model is None:
            message = "; ".join(str(p) for p in checked.problems)[:1000]
            self.gateway.event(body, "Warning", INVALID_SPEC, message)
            status = _status_of(body) or AutoGLMModelStatus()
            status.conditions, changed = set_condition(
                status.conditions, READY, "False", INVALID_SPEC, message, now=now,
                observed_generation=meta.get("generation"),
            )  # fmt: skip
            if changed:
                self._write_status(body, status)
            return None
        current = _status_of(body)
        if current is None and body.get("status"):
            self.gateway.event(body, "Warning", "InvalidStatus", "the status cannot be read; it is rebuilt")
        return checked.model.model_copy(update={"status": current or AutoGLMModelStatus()})

    def observe(self, model: AutoGLMModel, body: dict[str, Any], now: datetime) -> tuple[Observed, _Seen]:
        namespace, name = model.metadata.namespace or "default", model.metadata.name or ""
        status = model.status or AutoGLMModelStatus()
        seen = _Seen()
        building = status.revisions.candidate or rollout_revision(model.spec)
        runs = self.gateway.list("Workflow", namespace, {MODEL_LABEL: name, REVISION_LABEL: building})
        newest = max(runs, key=_attempt, default=None)
        seen.run = pipeline_run(
            newest, variants=self._variants(model, newest), repository=self.options.artifact_repository
        )
        targets: dict[str, TargetObserved] = {}
        servers: dict[str, str] = {}
        for target in model.spec.targets:
            config = self.gateway.get("ConfigMap", namespace, agent_config_name(model, target.name))
            seen.config_maps[target.name] = config is not None
            seen.variants[target.name] = ((config or {}).get("data") or {}).get(VARIANTS_KEY)
            seen.desired[target.name] = _desired(config)
            seen.services[target.name] = self.gateway.get(
                "InferenceService", namespace, inference_service_name(model, target.name)
            )
            pods = self.gateway.list("Pod", namespace, {MODEL_LABEL: name, TARGET_LABEL: target.name})
            serving, seen.ready[target.name] = target_serving(pods)
            servers[target.name] = ",".join(sorted(p["metadata"]["name"] for p in pods))
            targets[target.name] = TargetObserved(serving)
        analyses = self._analyse(model, status, targets, servers, now)
        targets = {t: TargetObserved(o.serving, analyses.get(t)) for t, o in targets.items()}
        found = intents(body, now)
        seen.intent_keys = [key for key, _ in found]
        observed = Observed(pipeline=seen.run, intents=tuple(i for _, i in found), targets=targets)
        return observed, seen

    def _variants(self, model: AutoGLMModel, run: dict[str, Any] | None) -> list[str]:
        """The variants a Workflow builds: those of the manifest it was given (the spec may have moved)."""
        for parameter in ((run or {}).get("spec") or {}).get("arguments", {}).get("parameters") or []:
            if parameter.get("name") == MANIFEST_PARAMETER:
                built = _manifest_variants(str(parameter.get("value") or ""))
                if built is not None:
                    return list(built)
        return [v.name for v in variants(model.spec)]

    def _analyse(
        self,
        model: AutoGLMModel,
        status: AutoGLMModelStatus,
        targets: dict[str, TargetObserved],
        servers: dict[str, str],
        now: datetime,
    ) -> dict[str, Any]:
        if self.options.prometheus_url is None:
            return {}
        key = (model.metadata.namespace or "default", model.metadata.name or "")
        name = key[1]

        def source(target: str) -> FiguresSource:
            selector = self.options.target_selector.format(model=name, target=target)
            assert self.options.prometheus_url is not None
            return PrometheusSource(self.options.prometheus_url, selector=selector)

        analyst = self._analysts.setdefault(key, CanaryAnalyst(source, log=log.info))
        live = {
            t.name: (t.candidate, t.revision)
            for t in status.targets
            if t.candidate and t.name in targets and targets[t.name].serving.canary == t.candidate
        }
        analyses, _ = analyst.analyse(
            model.spec.rollout.analysis, status, live, servers,
            lambda target: inference_service_name(model, target), now,
        )  # fmt: skip
        return analyses

    # -- acting ------------------------------------------------------------------------------------

    def act(self, model: AutoGLMModel, result: Plan, seen: _Seen) -> None:
        first = model.spec.targets[0].name
        changed: dict[str, Desired | None] = {}
        for action in result.actions:
            if action.kind == "StartPipeline":
                self._submit(model, action)
                continue
            target = action.target or first
            before = changed.get(target, seen.desired.get(target))
            try:
                changed[target] = desired_after(before, action)
            except ServingActionError as exc:
                self.gateway.event(_ref(model), "Warning", "ServingActionFailed", f"target {target}: {exc}")
        # A candidate the status no longer has (rolled back, aborted or superseded before any replica
        # reported it loaded, so the plan saw nothing to unload) leaves the ConfigMap too.
        wanted = {t.name: t.candidate for t in result.status.targets}
        for target_name in seen.desired:
            current = changed.get(target_name, seen.desired[target_name])
            if (
                current is not None
                and current.candidate
                and current.candidate.revision != wanted.get(target_name)
            ):
                unload = Action("Unload", current.candidate.revision, target=target_name)
                changed[target_name] = desired_after(current, unload)
        policy = result.status.prompt_policy
        written = set()
        for target_name, desired in changed.items():
            if desired is None or _same(desired, seen.desired.get(target_name)):
                continue
            spec = next(t for t in model.spec.targets if t.name == target_name)
            config = agent_config(model, spec, desired, prompt_policy=policy)
            written.add(target_name)
            if seen.config_maps.get(target_name):
                self.gateway.patch("ConfigMap", config["metadata"]["namespace"], config["metadata"]["name"],
                                   {"data": config["data"]})  # fmt: skip
            else:
                self.gateway.create(config)
        document = variants_document(
            model, policy.shares if policy else None, policy.proposals if policy else ()
        )
        for spec in model.spec.targets:  # the prompt policy moved, or a ConfigMap from before it existed
            if (
                spec.name in written
                or not seen.config_maps.get(spec.name)
                or seen.variants.get(spec.name) == document
            ):
                continue
            self.gateway.patch("ConfigMap", model.metadata.namespace or "default",
                               agent_config_name(model, spec.name), {"data": {VARIANTS_KEY: document}})  # fmt: skip
        for spec in model.spec.targets:
            desired = changed.get(spec.name) or seen.desired.get(spec.name)
            if desired is not None:
                self._serve(model, spec, desired, seen.services.get(spec.name))

    def _serve(
        self, model: AutoGLMModel, target: Target, desired: Desired, current: dict[str, Any] | None
    ) -> None:
        """The target's InferenceService: created on the first stable revision; afterwards kept to
        the target's spec (replicas, resources, placement) with its ``storageUri`` left as it is, so
        a swap never restarts the pods (the agents swap inside them)."""
        built = inference_service(model, target, desired)
        if current is None:
            self.gateway.create(built)
            return
        model_spec = ((current.get("spec") or {}).get("predictor") or {}).get("model") or {}
        if model_spec.get("storageUri"):
            built["spec"]["predictor"]["model"]["storageUri"] = model_spec["storageUri"]
        patch = overlay_diff(
            {"metadata": _labelled(current), "spec": current.get("spec") or {}},
            {"metadata": _labelled(built), "spec": built["spec"]},
        )
        if patch:
            meta = built["metadata"]
            self.gateway.patch("InferenceService", meta["namespace"], meta["name"], patch)

    def _submit(self, model: AutoGLMModel, action: Action) -> None:
        namespace = model.metadata.namespace or "default"
        template = build_workflow_template(
            model, image=self.options.image, service_account=self.options.pipeline_service_account
        ).to_dict()
        owners = owner_references(model)
        if owners:
            template["metadata"]["ownerReferences"] = [to_dict(o) for o in owners]
        if not self.gateway.create(template):  # the template follows the spec (steps, image)
            self.gateway.patch("WorkflowTemplate", namespace, template["metadata"]["name"],
                               {"metadata": {"labels": template["metadata"]["labels"]}, "spec": template["spec"]})  # fmt: skip
        run = workflow(model, action.revision, attempt=action.attempt or 1, baseline=action.baseline)
        if not self.gateway.create(run):
            log.info("workflow %s exists: the run was submitted before", run["metadata"]["name"])

    # -- recording ---------------------------------------------------------------------------------

    def record(
        self, model: AutoGLMModel, body: dict[str, Any], result: Plan, seen: _Seen, now: datetime
    ) -> None:
        namespace, name = model.metadata.namespace or "default", model.metadata.name or ""
        status = result.status
        for d in result.decisions:
            with self._ledger_lock:
                entry = self._ledger.append(
                    namespace, name, d.kind, d.reason[:4000], revision=d.revision, actor=d.actor,
                    evidence=d.evidence, idempotency_key=d.idempotency_key[:255],
                )  # fmt: skip
            telemetry.DECISIONS.labels(d.kind).inc()
            self.gateway.event(
                body, "Warning" if d.kind in WARNINGS else "Normal", d.kind, f"{d.revision}: {d.reason}"
            )
            status = status.model_copy(
                update={"last_decision": Decision(kind=entry.decision, time=entry.time, audit_id=entry.id,
                                                  reason=entry.reason[:32768])}
            )  # fmt: skip
        for intent, why in result.ignored:
            self.gateway.event(body, "Normal", "IntentIgnored", f"{intent.kind} from {intent.actor}: {why}")
        entries = []
        for item in status.targets:
            ready = seen.ready.get(item.name, 0)
            entries.append(item.model_copy(update={"ready": ready > 0, "replicas": ready,
                                                    "url": _url(seen.services.get(item.name))}))  # fmt: skip
        status = status.model_copy(update={"targets": entries})
        status.conditions = conditions(status, seen.run, rollout_revision(model.spec), seen.ready, now)
        self._write_status(body, status)
        self.gateway.remove_annotations(namespace, name, seen.intent_keys)

    def _write_status(self, body: dict[str, Any], status: AutoGLMModelStatus) -> None:
        new = status.to_json()
        old = body.get("status") or {}
        if new == old:
            return
        meta = body["metadata"]
        self.gateway.patch_model_status(meta["namespace"], meta["name"], merge_diff(old, new))

    # -- deletion ----------------------------------------------------------------------------------

    def cleanup(self, namespace: str, name: str) -> list[str]:
        """Delete what the operator created for the model (its finalizer; garbage collection by owner
        references does it too where it runs). Returns what was deleted, as ``Kind/name``."""
        deleted = []
        labels = {MODEL_LABEL: name}
        # After a reconcile in progress (an owned object's event starts one at any time): one that read
        # the model before its deletion would create or patch what is deleted here, after it.
        with self._lock((namespace, name)):
            for kind in ("InferenceService", "ConfigMap", "Workflow", "WorkflowTemplate"):
                for obj in self.gateway.list(kind, namespace, labels):
                    self.gateway.delete(kind, namespace, obj["metadata"]["name"])
                    deleted.append(f"{kind}/{obj['metadata']['name']}")
            self._analysts.pop((namespace, name), None)
        return deleted


@functools.lru_cache(maxsize=256)
def _manifest_variants(text: str) -> tuple[str, ...] | None:
    """The variant names of a Workflow's manifest parameter, parsed and validated once per text (a
    Workflow's manifest never changes; every reconcile of its model asks again)."""
    try:
        built = validate_document(yaml.safe_load(text)).model
    except yaml.YAMLError:
        return None
    return None if built is None else tuple(v.name for v in variants(built.spec))


def _attempt(workflow: dict[str, Any]) -> int:
    try:
        return int(((workflow.get("metadata") or {}).get("labels") or {}).get(ATTEMPT_LABEL, 1))
    except ValueError:
        return 1


def _status_of(body: dict[str, Any]) -> AutoGLMModelStatus | None:
    try:
        return AutoGLMModelStatus.model_validate(body.get("status") or {})
    except ValueError:
        return None


def _stable_artifact(model: AutoGLMModel, seen: _Seen) -> Callable[[str], str | None]:
    """What a retraining revision is validated against: the stable artifact the first target's agents
    were told to serve (its URI in the artifact repository), when it is that revision's."""

    def artifact_of(revision: str) -> str | None:
        status = model.status or AutoGLMModelStatus()
        first = model.spec.targets[0].name
        desired = seen.desired.get(first)
        served = next((t.revision for t in status.targets if t.name == first), None)
        if desired is None or revision != status.revisions.stable or desired.stable.revision != served:
            return None
        return desired.stable.uri

    return artifact_of


def _desired(config: dict[str, Any] | None) -> Desired | None:
    """The desired state a target's ConfigMap holds (None: none yet, or unreadable: written anew)."""
    if config is None:
        return None
    try:
        return Desired.from_json(json.loads((config.get("data") or {}).get(AGENT_CONFIG_KEY, "null")))
    except (ValueError, DesiredStateError):
        return None


def _url(service: dict[str, Any] | None) -> str | None:
    """The InferenceService's URL, as KServe reports it once it is ready."""
    url = ((service or {}).get("status") or {}).get("url")
    return str(url) if url else None


def _labelled(obj: dict[str, Any]) -> dict[str, Any]:
    """The labels and annotations of an object (what the operator sets of its metadata)."""
    meta = obj.get("metadata") or {}
    return {"labels": meta.get("labels") or {}, "annotations": meta.get("annotations") or {}}


def _same(a: Desired, b: Desired | None) -> bool:
    """The same assignments (the generation aside): nothing for the agents to do."""
    return b is not None and a.stable == b.stable and a.candidate == b.candidate


def _ref(model: AutoGLMModel) -> dict[str, Any]:
    return {"metadata": {"name": model.metadata.name, "namespace": model.metadata.namespace or "default",
                         "uid": model.metadata.uid, "resourceVersion": model.metadata.resource_version}}  # fmt: skip
