"""``autoglm agent``: the sidecar that makes its server serve what its target's ConfigMap says.

As KServe's model agent does for multi-model serving, the agent pulls: it reads the desired state
(the ConfigMap mounted as a file, which the kubelet, or KubeEdge's edgecore on an edge node,
keeps current, so a node cut off from the API server still has the last state it received), asks
its server what it serves (``GET /v2/repository/index``), and carries out ``reconcile.steps`` on it
through the repository routes on loopback (with the admin token). Before a load it brings a remote
artifact into the node's cache (``autoglm_core.uris.resolve``: a copy already there is reused, so a
swap never downloads what the node has; a local path is used where it is). The server's load
verifies every file against the model card and the digest the operator wrote, once, and refuses a
corrupt copy while it keeps serving what it serves.

Each pass writes what the server serves and the last error to ``--status-file`` (JSON) and, in a
pod, to the pod's ``autoglm.io/served`` annotation (``agent.report``), for the operator to read
back; a server that is down or refuses a call is retried next pass.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoglm_core.uris import SourceError, resolve
from autoglm_operator.agent.desired import Desired, DesiredStateError
from autoglm_operator.agent.reconcile import Step, steps
from autoglm_operator.agent.report import PodReporter
from autoglm_operator.backends.local_serving import LocalServing, ServingBackendError
from autoglm_operator.plan import Serving

log = logging.getLogger(__name__)


class AgentError(Exception):
    """One pass could not finish (the message names the step and why); the next pass retries."""


@dataclass
class PassResult:
    served: Serving | None
    applied: list[Step] = field(default_factory=list)
    error: str | None = None
    generation: int | None = None

    def to_json(self) -> dict[str, Any]:
        served = self.served
        return {
            "served": None
            if served is None
            else {"stable": served.stable, "canary": served.canary, "weight": served.weight},
            "applied": [f"{s.kind} {s.revision}" for s in self.applied],
            "error": self.error,
            "generation": self.generation,
            "at": time.time(),
        }


class Agent:
    def __init__(
        self,
        *,
        config: Path,
        server: LocalServing,
        cache_dir: Path,
        status_file: Path | None = None,
        reporter: PodReporter | None = None,
    ) -> None:
        self.config = config
        self.server = server
        self.cache_dir = cache_dir
        self.status_file = status_file
        self.reporter = reporter

    def read_desired(self) -> Desired:
        try:
            text = self.config.read_text()
        except OSError as exc:
            raise AgentError(f"{self.config}: cannot read the desired state: {exc.strerror or exc}") from exc
        try:
            return Desired.from_json(json.loads(text))
        except json.JSONDecodeError as exc:
            raise AgentError(f"{self.config}: not JSON: {exc}") from exc
        except DesiredStateError as exc:
            raise AgentError(f"{self.config}: {exc}") from exc

    def fetch(self, step: Step) -> Path:
        """The artifact of a load step on this node (a remote one copied into the cache)."""
        assert step.uri is not None
        try:
            return resolve(step.uri, cache_dir=self.cache_dir)
        except SourceError as exc:
            raise AgentError(f"{step.kind} {step.revision}: {exc}") from exc

    def apply(self, step: Step) -> None:
        try:
            if step.kind in ("load-stable", "load-canary"):
                parameters: dict[str, Any] = {"uri": str(self.fetch(step))}
                if step.sha256:
                    parameters["sha256"] = step.sha256
                if step.kind == "load-canary":
                    parameters["canaryWeight"] = step.weight or 0
                self.server.call("load", {"parameters": parameters})
            elif step.kind == "weight":
                self.server.call("weight", {"parameters": {"canaryWeight": step.weight or 0}})
            else:  # promote, rollback
                self.server.call(step.kind)
        except ServingBackendError as exc:
            raise AgentError(f"{step.kind} {step.revision}: {exc}") from exc

    def reconcile_once(self) -> PassResult:
        """One pass: read, observe, apply; never raises for what the next pass may fix."""
        result = PassResult(served=None)
        try:
            desired = self.read_desired()
            result.generation = desired.generation
            result.served = self.server.observe()
            for step in steps(desired, result.served):
                log.info("agent: %s %s", step.kind, step.revision)
                self.apply(step)
                result.applied.append(step)
            if result.applied:
                result.served = self.server.observe()
        except (AgentError, ServingBackendError) as exc:
            result.error = str(exc)
            log.warning("agent: %s", exc)
            with contextlib.suppress(ServingBackendError):
                result.served = self.server.observe()
        self._write_status(result)
        if self.reporter is not None:
            self.reporter.report(result.to_json())
        return result

    def run(self, interval: float, *, stop: Any = None) -> None:
        """Reconcile every ``interval`` seconds, and at once when the desired state file changes."""
        last_seen: float | None = None
        next_pass = 0.0
        while stop is None or not stop.is_set():
            try:
                changed = self.config.stat().st_mtime
            except OSError:
                changed = None
            now = time.monotonic()
            if changed != last_seen or now >= next_pass:
                last_seen = changed
                self.reconcile_once()
                next_pass = now + interval
            time.sleep(min(0.5, interval))

    def _write_status(self, result: PassResult) -> None:
        if self.status_file is None:
            return
        temporary = self.status_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        temporary.replace(self.status_file)  # a reader never sees half a file
