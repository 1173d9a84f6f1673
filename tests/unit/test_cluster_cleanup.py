"""Deleting a model waits for a reconcile in progress: one that read the model before its deletion
would otherwise create or patch its InferenceService after the cleanup removed it (a leftover the
chart's RBAC test saw about one run in three)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from autoglm_operator.kube.reconciler import ClusterOptions, ClusterReconciler


class _Gateway:
    """The calls a reconcile and a cleanup make, with the reconcile's read of the model held."""

    def __init__(self) -> None:
        self.reading = threading.Event()
        self.release = threading.Event()
        self.objects = {"InferenceService": ["glm4-chat-edge"]}
        self.calls: list[str] = []

    def get_model(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reading.set()
        assert self.release.wait(30)
        self.calls.append("reconcile read the model")
        return None  # gone by then: nothing more to do

    def list(self, kind: str, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        return [{"metadata": {"name": n}} for n in self.objects.get(kind, [])]

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.calls.append(f"cleanup deleted {kind}/{name}")


def test_cleanup_waits_for_the_reconcile_in_progress(tmp_path: Path) -> None:
    gateway = _Gateway()
    reconciler = ClusterReconciler(gateway, ClusterOptions(audit_url=f"sqlite:///{tmp_path / 'a.db'}"))  # type: ignore[arg-type]
    reconciling = threading.Thread(target=reconciler.reconcile, args=("ml", "glm4-chat"))
    reconciling.start()
    assert gateway.reading.wait(30)
    removed: list[str] = []
    cleaning = threading.Thread(target=lambda: removed.extend(reconciler.cleanup("ml", "glm4-chat")))
    cleaning.start()
    cleaning.join(0.3)
    assert cleaning.is_alive()  # held while the reconcile runs
    gateway.release.set()
    reconciling.join(30)
    cleaning.join(30)
    assert gateway.calls == ["reconcile read the model", "cleanup deleted InferenceService/glm4-chat-edge"]
    assert removed == ["InferenceService/glm4-chat-edge"]
