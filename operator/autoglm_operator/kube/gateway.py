"""Every Kubernetes API call the operator makes, in one place (the official ``kubernetes`` client).

The handlers and the reconciler never touch the client: they ask the gateway, which speaks in plain
JSON objects (``dict``), turns "already exists" and "not found" into return values where those are
normal outcomes (a Workflow submitted again after a restart is a 409: the same run), and records
each call as ``(verb, group, resource)`` in ``calls``, from which the chart's RBAC rules are checked.
The status is written only through the status subresource; the spec is never written.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

GROUP, VERSION, PLURAL = "autoglm.io", "v1alpha1", "autoglmmodels"
ARGO = ("argoproj.io", "v1alpha1")
KSERVE = ("serving.kserve.io", "v1beta1")
#: (group, version, plural) of each custom kind the operator creates.
CUSTOM = {
    "Workflow": (*ARGO, "workflows"),
    "WorkflowTemplate": (*ARGO, "workflowtemplates"),
    "InferenceService": (*KSERVE, "inferenceservices"),
}
COMPONENT = "autoglm-operator"

log = logging.getLogger(__name__)


class GatewayError(Exception):
    """An API call that failed in a way the caller cannot treat as an outcome (the message says which)."""


def load_config(kubeconfig: str | None = None) -> None:
    """In a pod, its service account; elsewhere the kubeconfig (``kubeconfig`` or ``$KUBECONFIG``)."""
    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return
        except config.ConfigException:
            pass
    config.load_kube_config(config_file=kubeconfig)


def _selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


@dataclass
class Gateway:
    api_client: Any = None
    #: Every call made: (verb, API group, resource); read by the RBAC test.
    calls: set[tuple[str, str, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.api_client = self.api_client or client.ApiClient()
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    def _call(self, verb: str, group: str, resource: str) -> None:
        with self._lock:
            self.calls.add((verb, group, resource))

    @staticmethod
    def _fail(what: str, exc: ApiException) -> GatewayError:
        return GatewayError(f"{what}: {exc.status} {exc.reason}: {str(exc.body or '')[:300]}")

    # -- the model ----------------------------------------------------------------------------------

    def get_model(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._call("get", GROUP, PLURAL)
        try:
            body = cast(
                dict[str, Any],
                self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name),
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise self._fail(f"get AutoGLMModel {namespace}/{name}", exc) from exc
        return body

    def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Replace the status through the status subresource (a merge patch of ``status``; keys the new
        status lacks are set to null so nothing stale stays)."""
        self._call("patch", GROUP, f"{PLURAL}/status")
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": status}
            )
        except ApiException as exc:
            raise self._fail(f"patch the status of AutoGLMModel {namespace}/{name}", exc) from exc

    def remove_annotations(self, namespace: str, name: str, keys: list[str]) -> None:
        if not keys:
            return
        self._call("patch", GROUP, PLURAL)
        patch = {"metadata": {"annotations": dict.fromkeys(keys)}}
        try:
            self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)
        except ApiException as exc:
            if exc.status != 404:
                raise self._fail(
                    f"remove annotations {keys} of AutoGLMModel {namespace}/{name}", exc
                ) from exc

    # -- owned custom objects -----------------------------------------------------------------------

    def create(self, obj: dict[str, Any]) -> bool:
        """Create ``obj`` (a Workflow, WorkflowTemplate, InferenceService or ConfigMap); False when one
        of that name exists already."""
        kind, meta = obj["kind"], obj["metadata"]
        namespace = meta["namespace"]
        try:
            if kind == "ConfigMap":
                self._call("create", "", "configmaps")
                self.core.create_namespaced_config_map(namespace, obj)  # type: ignore[arg-type]  # a dict body
            else:
                group, version, plural = CUSTOM[kind]
                self._call("create", group, plural)
                self.custom.create_namespaced_custom_object(group, version, namespace, plural, obj)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise self._fail(f"create {kind} {namespace}/{meta['name']}", exc) from exc
        return True

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            if kind == "ConfigMap":
                self._call("get", "", "configmaps")
                found = self.core.read_namespaced_config_map(name, namespace)
                data: dict[str, Any] = self.api_client.sanitize_for_serialization(found)
                return data
            group, version, plural = CUSTOM[kind]
            self._call("get", group, plural)
            body = cast(
                dict[str, Any],
                self.custom.get_namespaced_custom_object(group, version, namespace, plural, name),
            )
            return body
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise self._fail(f"get {kind} {namespace}/{name}", exc) from exc

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """A JSON merge patch of an object the operator owns."""
        try:
            if kind == "ConfigMap":
                self._call("patch", "", "configmaps")
                self.core.patch_namespaced_config_map(name, namespace, patch)
                return
            group, version, plural = CUSTOM[kind]
            self._call("patch", group, plural)
            self.custom.patch_namespaced_custom_object(group, version, namespace, plural, name, patch)
        except ApiException as exc:
            raise self._fail(f"patch {kind} {namespace}/{name}", exc) from exc

    def list(self, kind: str, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = _selector(labels)
        try:
            if kind in ("ConfigMap", "Pod"):
                plural = "configmaps" if kind == "ConfigMap" else "pods"
                self._call("list", "", plural)
                method = (
                    self.core.list_namespaced_config_map
                    if kind == "ConfigMap"
                    else self.core.list_namespaced_pod
                )
                found = method(namespace, label_selector=selector)
                items: list[dict[str, Any]] = self.api_client.sanitize_for_serialization(found.items)
            else:
                group, version, plural = CUSTOM[kind]
                self._call("list", group, plural)
                listed = self.custom.list_namespaced_custom_object(
                    group, version, namespace, plural, label_selector=selector
                )
                items = list(cast(dict[str, Any], listed).get("items", []))
        except ApiException as exc:
            raise self._fail(f"list {kind} in {namespace} ({selector})", exc) from exc
        # A server that ignores label selectors (or an older one) would hand back others' objects.
        return [i for i in items if labels.items() <= ((i.get("metadata") or {}).get("labels") or {}).items()]

    def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            if kind == "ConfigMap":
                self._call("delete", "", "configmaps")
                self.core.delete_namespaced_config_map(name, namespace)
                return
            group, version, plural = CUSTOM[kind]
            self._call("delete", group, plural)
            self.custom.delete_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as exc:
            if exc.status != 404:
                raise self._fail(f"delete {kind} {namespace}/{name}", exc) from exc

    # -- events -------------------------------------------------------------------------------------

    def event(self, model: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A Kubernetes Event on the model (``kubectl describe agm`` lists them). Best effort: an
        Event that cannot be written is not a reason to stop (the ledger has the decision)."""
        meta = model["metadata"]
        now = datetime.now(UTC)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "AutoGLMModel", "name": meta["name"],
                "namespace": meta["namespace"], "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_, "reason": reason[:128], "message": message[:1024],
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
            "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "count": 1,
        }  # fmt: skip
        self._call("create", "", "events")
        try:
            self.core.create_namespaced_event(meta["namespace"], body)  # type: ignore[arg-type]  # a dict body
        except ApiException as exc:
            log.warning(
                "event %s on %s/%s not written: %s", reason, meta["namespace"], meta["name"], exc.reason
            )
