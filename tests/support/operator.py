"""The real operator (kopf, the reconciler, the gateway) in a thread against an emulated cluster."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
from kubernetes import config

from autoglm_operator.kube.gateway import Gateway
from autoglm_operator.kube.operator import PeeringOptions, build_registry
from autoglm_operator.kube.reconciler import ClusterOptions, ClusterReconciler
from tests.support.k8s_emulator import EmulatedCluster


@dataclass
class RunningOperator:
    cluster: EmulatedCluster
    audit_url: str
    options: dict[str, Any] = field(default_factory=dict)
    peering: PeeringOptions = field(default_factory=lambda: PeeringOptions(standalone=True))
    interval: float = 0.5

    def __post_init__(self) -> None:
        self.gateway = Gateway(config.new_client_from_config(config_file=str(self.cluster.kubeconfig)))
        options = ClusterOptions(audit_url=self.audit_url, **self.options)
        self.reconciler = ClusterReconciler(self.gateway, options)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: list[BaseException] = []

    def start(self) -> RunningOperator:
        registry = build_registry(
            self.reconciler, interval=self.interval, peering=self.peering, same_login=True
        )

        def main() -> None:
            try:
                kopf.run(
                    registry=registry, clusterwide=True, stop_flag=self._stop, ready_flag=self._ready,
                    standalone=self.peering.standalone, priority=self.peering.priority,
                    peering_name=None if self.peering.standalone else self.peering.name,
                )  # fmt: skip
            except BaseException as exc:  # reported by start() and stop()
                self.failure.append(exc)
                self._ready.set()

        self._thread = threading.Thread(target=main, name="autoglm-operator", daemon=True)
        self._thread.start()
        started = self._ready.wait(30)
        assert started, "the operator did not start in 30 s"
        assert not self.failure, f"the operator did not start: {self.failure}"
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            assert not self._thread.is_alive(), "the operator did not stop"
        self.reconciler.close()
        assert not self.failure, f"the operator failed: {self.failure}"

    def __enter__(self) -> RunningOperator:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def settings_for(path: Path) -> str:
    """An audit ledger URL in ``path``."""
    return f"sqlite:///{path / 'audit.db'}"
