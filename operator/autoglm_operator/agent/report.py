"""Where an agent tells the operator what its server serves: an annotation on its own pod.

Each replica's agent patches only its own pod (``POD_NAME`` and ``POD_NAMESPACE`` come from the
downward API), so replicas never contend for one object and a replica that is gone takes its report
with it; the operator lists the target's pods by label and sees every replica's answer (stable,
canary, weight, the generation of the desired state it acted on, the last error), which is what it
needs before it moves weight onto a candidate. A status ConfigMap would have needed a
read-modify-write per replica and the cleanup of departed ones.

A report that cannot be written (the API server is unreachable, an edge node cut off) is logged and
tried again next pass; it never stops the agent from serving.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

ANNOTATION = "autoglm.io/served"
POD_NAME_ENV = "POD_NAME"
POD_NAMESPACE_ENV = "POD_NAMESPACE"


class PodReporter:
    """Writes each pass's result into the ``autoglm.io/served`` annotation of the agent's pod."""

    def __init__(self, name: str, namespace: str, api: Any = None) -> None:
        self.name, self.namespace = name, namespace
        self._api = api

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> PodReporter | None:
        """The reporter of the pod named by the downward API; None outside a pod."""
        name, namespace = environ.get(POD_NAME_ENV), environ.get(POD_NAMESPACE_ENV)
        return cls(name, namespace) if name and namespace else None

    def api(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:  # outside a cluster: the kubeconfig (tests, a workstation)
                config.load_kube_config()
            self._api = client.CoreV1Api()
        return self._api

    def report(self, state: dict[str, Any]) -> bool:
        """Patch the pod's annotation with ``state``; False (logged) when the API server refused or
        could not be reached."""
        body = {"metadata": {"annotations": {ANNOTATION: json.dumps(state, sort_keys=True)}}}
        try:
            self.api().patch_namespaced_pod(self.name, self.namespace, body)
        except Exception as exc:  # the client raises ApiException, urllib3 and config errors alike
            log.warning("agent: could not report to pod %s/%s: %s", self.namespace, self.name, exc)
            return False
        return True
