"""The embedded loop (``autoglm run``): the reconcile core driven on this machine.

Every tick it observes the pipeline run of the revision being rolled out (``LocalPipelines``), what
the model server serves (``LocalServing``) and, during a canary, the figures of candidate and stable
since the step began (scraped from the server's ``/metrics``, judged by ``canary.judge``); asks
``plan()`` what to do; carries out the actions; appends the decisions to the audit ledger (each
under its idempotency key, so a restart never records one twice); and saves the status, so running
again resumes where it stopped. The server is started with the first promoted artifact.

First version: one target, served by one ``autoglm serve`` process on loopback, demo traffic from a
text file at ``traffic_rate`` requests per second. Not yet: rich live progress, the ``rollout``
commands, several targets.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import httpx

from autoglm_api.resource import AutoGLMModel
from autoglm_api.status import AutoGLMModelStatus
from autoglm_api.validation import load_manifest
from autoglm_core.audit import Ledger
from autoglm_core.revision import artifact_revision
from autoglm_inference.process import ServerProcess
from autoglm_operator.backends.local_pipeline import LocalPipelines
from autoglm_operator.backends.local_serving import LocalServing
from autoglm_operator.canary import judge
from autoglm_operator.metrics import MetricsUnavailableError, Scrape, figures, scrape
from autoglm_operator.plan import Action, Analysis, Observed, Plan, Serving, plan

Until = Literal["serving", "promoted"]
STATUS_FILE = "status.json"


@dataclass
class LoopOptions:
    state_dir: Path
    until: Until = "promoted"
    #: Requests per second of demo traffic while a canary runs (0: none, real clients send it).
    traffic_rate: float = 2.0
    traffic_prompts: tuple[str, ...] = ("To be, or not to be", "The king", "Words, words, words")
    tick_seconds: float = 1.0
    timeout_seconds: float = 1800.0
    audit_url: str | None = None
    pipeline_args: tuple[str, ...] = ()
    server_args: tuple[str, ...] = ()
    log: Callable[[str], None] = print


@dataclass
class _Canary:
    """The scrape the current canary step is judged from."""

    key: tuple[str, int] | None = None
    since: Scrape | None = None
    started: datetime | None = None


@dataclass
class EmbeddedLoop:
    manifest: Path
    options: LoopOptions
    server: ServerProcess | None = None
    _canary: _Canary = field(default_factory=_Canary)
    _stop: threading.Event = field(default_factory=threading.Event)
    #: The model name while a canary runs (set by each tick): what the demo traffic asks for.
    _traffic_to: str | None = None

    def __post_init__(self) -> None:
        self.options.state_dir.mkdir(parents=True, exist_ok=True)
        self.pipelines = LocalPipelines(
            self.options.state_dir / "pipelines", extra_args=self.options.pipeline_args
        )

    # -- state ------------------------------------------------------------------------------------

    def _status_file(self) -> Path:
        return self.options.state_dir / STATUS_FILE

    def load(self) -> AutoGLMModel:
        model = load_manifest(str(self.manifest))
        try:
            status = AutoGLMModelStatus.model_validate(json.loads(self._status_file().read_text()))
        except (OSError, ValueError):
            status = AutoGLMModelStatus()
        return model.model_copy(update={"status": status})

    def save(self, status: AutoGLMModelStatus) -> None:
        partial = self._status_file().with_suffix(".partial")
        partial.write_text(json.dumps(status.model_dump(mode="json", by_alias=True), indent=2))
        partial.replace(self._status_file())

    # -- one tick ---------------------------------------------------------------------------------

    def observe(self, model: AutoGLMModel, now: datetime) -> Observed:
        status = model.status or AutoGLMModelStatus()
        building = status.revisions.candidate or artifact_revision(model.spec)
        run = self.pipelines.observe(building)
        serving = Serving()
        if self.server is not None:
            serving = self._serving(model.metadata.name or "").observe()
        analysis = None
        candidate, step = status.revisions.candidate, status.canary.step
        if (
            self.server is not None
            and candidate is not None
            and step is not None
            and serving.canary == candidate
        ):
            analysis = self._analyse(model, candidate, step, status.revisions.stable, now)
        return Observed(pipeline=run, serving=serving, analysis=analysis)

    def _serving(self, name: str) -> LocalServing:
        assert self.server is not None
        return LocalServing(name, self.server.url, headers=self.server.admin_headers)

    def _analyse(
        self, model: AutoGLMModel, candidate: str, step: int, stable: str | None, now: datetime
    ) -> Analysis:
        assert self.server is not None
        name = model.metadata.name or ""
        try:
            current = scrape(f"{self.server.url}/metrics")
        except MetricsUnavailableError:
            current = None
        if self._canary.key != (candidate, step):  # a new step: judge from here on
            self._canary = _Canary((candidate, step), current, now)
        limits = model.spec.rollout.analysis
        if current is None:
            return Analysis(candidate, step, now, judge(None, None, limits))
        mine = figures(current, self._canary.since, name, candidate)
        theirs = figures(current, self._canary.since, name, stable) if stable else None
        return Analysis(candidate, step, now, judge(mine, theirs, limits))

    def act(self, model: AutoGLMModel, result: Plan) -> None:
        name = model.metadata.name or ""
        for action in result.actions:
            self.options.log(
                f"action: {action.kind} {action.revision}"
                + (f" {action.weight}%" if action.weight is not None else "")
            )
            if action.kind == "StartPipeline":
                self.pipelines.start(model, action)
            elif action.kind == "Promote" and self.server is None:
                if not action.uri:
                    raise RuntimeError(f"Promote {action.revision}: no artifact to serve")
                self.server = ServerProcess(
                    name,
                    action.uri,
                    *self.options.server_args,
                    log=self.options.state_dir / "server.log",
                    model_roots=[self.options.state_dir],
                ).wait_ready()
                self.options.log(f"serving {name} at {self.server.url}")
            elif self.server is not None:
                self._serving(name).apply(action)

    def record(self, model: AutoGLMModel, result: Plan) -> None:
        if not result.decisions:
            return
        namespace, name = model.metadata.namespace or "default", model.metadata.name or ""
        with Ledger(self.options.audit_url or f"sqlite:///{self.options.state_dir / 'audit.db'}") as ledger:
            for d in result.decisions:
                ledger.append(
                    namespace, name, d.kind, d.reason[:4000], revision=d.revision, actor=d.actor,
                    evidence=d.evidence, idempotency_key=d.idempotency_key[:255],
                )  # fmt: skip
                self.options.log(f"decision: {d.kind} {d.revision}: {d.reason}")

    def tick(self, now: datetime) -> tuple[AutoGLMModel, Plan]:
        model = self.load()
        result = plan(model, self.observe(model, now), now)
        self.act(model, result)
        self.record(model, result)
        self.save(result.status)
        self._traffic_to = model.metadata.name if result.status.revisions.candidate else None
        return model, result

    # -- the loop ---------------------------------------------------------------------------------

    def _traffic(self) -> None:
        rng = random.Random(0)
        while not self._stop.wait(1.0 / self.options.traffic_rate):
            server, name = self.server, self._traffic_to
            if server is None or name is None:
                continue
            body = {"model": name, "prompt": rng.choice(self.options.traffic_prompts), "max_tokens": 8}
            with contextlib.suppress(httpx.HTTPError):  # a swap or a stop in between: the next one
                httpx.post(f"{server.url}/openai/v1/completions", json=body, timeout=60)

    def _resume_server(self) -> None:
        """After a restart: serve the stable revision again (the canary is loaded by the next tick)."""
        model = self.load()
        stable = model.status.revisions.stable if model.status else None
        run = self.pipelines.observe(stable) if stable else None
        if self.server is None and run is not None and run.artifact_uri:
            self.act(
                model,
                Plan(
                    (Action("Promote", run.revision, uri=run.artifact_uri),),
                    model.status or AutoGLMModelStatus(),
                    (),
                ),
            )

    def run(self) -> AutoGLMModelStatus:
        """Tick until ``until`` holds (or the timeout); the server keeps running in ``self.server``."""
        self._resume_server()
        self._stop.clear()
        traffic = None
        if self.options.traffic_rate > 0:
            traffic = threading.Thread(target=self._traffic, name="autoglm-traffic", daemon=True)
            traffic.start()
        deadline = time.monotonic() + self.options.timeout_seconds
        try:
            while time.monotonic() < deadline:
                model, result = self.tick(datetime.now(UTC))
                status = result.status
                desired = artifact_revision(model.spec)
                if status.revisions.stable == desired and status.revisions.candidate is None:
                    return status
                if status.revisions.rejected == desired:
                    return status  # rolled back or failed: held until the manifest changes
                if self.options.until == "serving" and self.server is not None and status.revisions.stable:
                    return status
                time.sleep(self.options.tick_seconds)
            raise TimeoutError(
                f"{self.manifest}: not {self.options.until} after {self.options.timeout_seconds:.0f}s"
            )
        finally:
            self._stop.set()
            if traffic is not None:
                traffic.join(5)

    def close(self) -> None:
        self._stop.set()
        self.pipelines.close()
        if self.server is not None:
            self.server.stop()
            self.server = None
