"""The serving backend of the embedded loop: one ``autoglm serve`` process per target, driven through
its model repository routes (load, weight, promote, rollback, index), as the agent will drive the
servers of a cluster.

``observe()`` reads what the server serves (``GET /v2/repository/index``) into the core's
:class:`~autoglm_operator.plan.Serving`; ``apply(action)`` carries out one of the core's actions.
"""

from __future__ import annotations

from typing import Any

import httpx

from autoglm_operator.plan import Action, Serving


class ServingBackendError(Exception):
    """An action the server refused or could not take; the message names the action and the answer."""


class LocalServing:
    def __init__(
        self, name: str, base_url: str, *, headers: dict[str, str] | None = None, timeout: float = 300.0
    ):
        self.name, self.base_url = name, base_url.rstrip("/")
        self.headers = headers or {}
        self.timeout = timeout

    def call(self, verb: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"{self.base_url}/v2/repository/models/{self.name}/{verb}"
        try:
            r = httpx.post(url, json=body or {}, headers=self.headers, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise ServingBackendError(f"{verb} {self.name}: the server did not answer: {exc}") from exc
        if r.status_code >= 400:
            raise ServingBackendError(f"{verb} {self.name}: {r.status_code} {r.text[:300]}")
        data: dict[str, Any] = r.json()
        return data

    def observe(self) -> Serving:
        try:
            r = httpx.get(f"{self.base_url}/v2/repository/index", headers=self.headers, timeout=10)
            r.raise_for_status()
        except httpx.HTTPError as exc:
            raise ServingBackendError(f"index: the server did not answer: {exc}") from exc
        entry = next((e for e in r.json() if e.get("name") == self.name), None)
        if entry is None:
            return Serving()
        canary = entry.get("canary")
        return Serving(
            stable=(entry.get("stable") or {}).get("revision"),
            canary=canary.get("revision") if canary else None,
            weight=round(float(entry.get("canaryWeight") or 0)) if canary else 0,
        )

    def apply(self, action: Action) -> None:
        serving = self.observe()
        if action.kind == "LoadCanary":
            if not action.uri:
                raise ServingBackendError(f"LoadCanary {action.revision}: no artifact URI")
            self.call("load", {"parameters": {"uri": action.uri, "canaryWeight": action.weight or 0}})
        elif action.kind == "SetWeight":
            if serving.canary == action.revision:
                self.call("weight", {"parameters": {"canaryWeight": action.weight or 0}})
        elif action.kind == "Promote":
            if serving.canary == action.revision:
                self.call("promote")
            elif serving.stable != action.revision:
                if not action.uri:
                    raise ServingBackendError(f"Promote {action.revision}: not loaded and no artifact URI")
                self.call("load", {"parameters": {"uri": action.uri}})  # an atomic swap to it
        elif action.kind == "Unload":
            if serving.canary == action.revision:
                self.call("rollback")  # the canary leaves; stable stays
            # a former stable revision was retired by the promotion already
        else:
            raise ServingBackendError(f"{action.kind} is not a serving action")
