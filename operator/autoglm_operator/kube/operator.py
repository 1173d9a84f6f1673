"""The kopf operator: thin handlers around ``ClusterReconciler.reconcile``.

- AutoGLMModel create, update (spec, labels, annotations: the intents), resume (an operator that
  starts again finds its models) and a timer (``interval``: the canary's analysis, a Workflow's
  progress) all reconcile the model; the reconcile itself is idempotent and serialised per model.
- Events of what the operator owns (Argo Workflows, InferenceServices, the servers' pods whose agents
  report what they serve) reconcile their model at once, so the loop does not wait for the timer.
- Deletion: the finalizer ``autoglm.io/finalizer`` holds the model until every object the operator
  created for it is deleted (owner references also let the garbage collector do it).
- Peering: replicas of the operator see each other through kopf's peering objects; the one with the
  highest priority acts and the others pause (equal priorities would all pause, so each process
  takes a random priority unless ``--priority`` is given).

kopf's own writes (the finalizer, its progress annotations under ``kopf.autoglm.io``) are kopf's;
every other API call goes through ``kube.gateway``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from autoglm_operator.kube.gateway import GROUP, PLURAL, VERSION
from autoglm_operator.kube.reconciler import ClusterReconciler
from autoglm_pipelines.workflow import MANAGED_BY_LABEL, MODEL_LABEL

FINALIZER = "autoglm.io/finalizer"
PEERING = "autoglm"
MANAGED = {MANAGED_BY_LABEL: "autoglm"}

log = logging.getLogger(__name__)


def connection_info(configuration: Any) -> kopf.ConnectionInfo:
    """kopf's connection from a ``kubernetes.client.Configuration`` (the gateway's)."""
    # The kubernetes client keeps a kubeconfig's token under a key that changed between releases
    # ("authorization", then "BearerToken"); its auth settings give the header either way.
    header = next(
        (s.get("value") for s in configuration.auth_settings().values() if s.get("key") == "authorization"),
        "",
    )
    scheme, _, token = str(header or "").strip().partition(" ")  # "Bearer TOKEN", "Basic B64"
    return kopf.ConnectionInfo(
        server=configuration.host,
        scheme=scheme if token else None,
        token=token or None,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        username=configuration.username or None,
        password=configuration.password or None,
    )


@dataclass
class PeeringOptions:
    #: No peering at all (one replica, or tests): acts whatever other replicas do.
    standalone: bool = False
    name: str = PEERING
    #: This replica's priority (None: random, so two replicas never tie and freeze).
    priority: int | None = None


def build_registry(
    reconciler: ClusterReconciler,
    *,
    interval: float = 5.0,
    peering: PeeringOptions | None = None,
    same_login: bool = False,
) -> kopf.OperatorRegistry:
    """A registry of the operator's handlers around ``reconciler`` (one per operator, so two can run
    side by side in one process, as the two-replica tests do). ``same_login``: kopf connects with the
    gateway's credentials (a ``--kubeconfig`` given explicitly) instead of finding its own."""
    registry = kopf.OperatorRegistry()
    peering = peering or PeeringOptions()
    if same_login:

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return connection_info(reconciler.gateway.api_client.configuration)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.autoglm.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="kopf.autoglm.io", key="last-handled-configuration"
        )
        settings.posting.level = logging.WARNING  # kopf's own Events: failures only; decisions are ours
        settings.peering.standalone = peering.standalone
        settings.peering.name = peering.name
        settings.peering.priority = (
            peering.priority if peering.priority is not None else random.randint(1, 2**30)
        )
        settings.watching.server_timeout = 300
        settings.execution.max_workers = 8
        # A deletion waits for the timer's reconcile in progress to end; kopf polls an exiting timer
        # every 60 s by default, so a `kubectl delete` that came during a reconcile hung for a minute.
        settings.background.cancellation_polling = 1.0

    def reconcile(namespace: str | None, name: str | None) -> None:
        if namespace and name:
            reconciler.reconcile(namespace, name)

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry, id="create")
    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry, id="update")
    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry, id="resume")
    def changed(namespace: str | None, name: str, **_: Any) -> None:
        reconcile(namespace, name)

    @kopf.timer(GROUP, VERSION, PLURAL, registry=registry, interval=interval, sharp=False)
    def tick(namespace: str | None, name: str, **_: Any) -> None:
        reconcile(namespace, name)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def deleted(namespace: str | None, name: str, **_: Any) -> None:
        removed = reconciler.cleanup(namespace or "default", name)
        log.info("AutoGLMModel %s/%s deleted: removed %s", namespace, name, ", ".join(removed) or "nothing")

    def owned(labels: Mapping[str, str], namespace: str | None, **_: Any) -> None:
        reconcile(namespace, labels.get(MODEL_LABEL))

    for resource in (
        ("argoproj.io", "v1alpha1", "workflows"),
        ("serving.kserve.io", "v1beta1", "inferenceservices"),
        ("v1", "pods"),
    ):
        kopf.on.event(*resource, labels=MANAGED, registry=registry, id=f"owned-{resource[-1]}")(owned)
    return registry
