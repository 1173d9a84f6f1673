"""The embedded loop (``autoglm run``): the reconcile core driven on this machine.

Every tick it observes the pipeline run of the revision being rolled out (``LocalPipelines``), what
the model server serves (``LocalServing``) and, during a canary, the figures of candidate and stable
since the step began (scraped from the server's ``/metrics``, judged by ``canary.judge``); asks
``plan()`` what to do; carries out the actions; appends the decisions to the audit ledger (each
under its idempotency key, so a restart never records one twice); and saves the status, so running
again resumes where it stopped. The server is started with the first promoted artifact.

One target, served by one ``autoglm serve`` process on loopback; demo traffic at ``traffic_rate``
requests per second; manual intents (``autoglm rollout promote|abort|retry``) read from the state
directory (``backends.local_state``). The canary's figures are the server's own ``/metrics``,
scraped here, or PromQL against a Prometheus that scrapes the server (``prometheus_url``; the
server is listed for it in ``STATE_DIR/prometheus-targets.json``). A first rollout serves the
uncompressed source first, the baseline its candidate is canaried against, when this machine and
the target's memory hold both. Not yet: several targets with a precision each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal

import httpx

from autoglm_api.resource import AutoGLMModel
from autoglm_api.status import AutoGLMModelStatus, Decision, TargetStatus
from autoglm_api.validation import load_manifest
from autoglm_core.audit import Ledger
from autoglm_core.audit.ledger import URL_ENV
from autoglm_core.revision import artifact_revision
from autoglm_inference.process import ServerProcess
from autoglm_operator.backends.local_pipeline import LocalPipelines
from autoglm_operator.backends.local_serving import LocalServing
from autoglm_operator.backends.local_state import LocalState
from autoglm_operator.canary import Figures, judge
from autoglm_operator.metrics import FiguresSource, MetricsUnavailableError, ScrapeSource
from autoglm_operator.plan import Analysis, Observed, Plan, Serving, duration, plan
from autoglm_operator.promql import PrometheusSource

Until = Literal["serving", "promoted", "forever"]


@dataclass
class LoopOptions:
    state_dir: Path
    until: Until = "promoted"
    #: Requests per second of demo traffic while a canary runs (0: none, real clients send it).
    traffic_rate: float = 2.0
    #: Demo clients sending that traffic side by side (the server batches them).
    traffic_clients: int = 2
    traffic_prompts: tuple[str, ...] = ("To be, or not to be", "The king", "Words, words, words")
    tick_seconds: float = 1.0
    timeout_seconds: float = 1800.0
    audit_url: str | None = None
    #: A Prometheus HTTP API that scrapes the loop's servers: the canary's figures as PromQL there
    #: (the scrape targets are written to ``STATE_DIR/prometheus-targets.json`` for its file_sd).
    #: None: the servers' own /metrics, scraped in process.
    prometheus_url: str | None = None
    pipeline_args: tuple[str, ...] = ()
    server_args: tuple[str, ...] = ()
    log: Callable[[str], None] = print
    #: Called after every tick with the model, what was observed and the plan (live progress).
    on_tick: Callable[[AutoGLMModel, Observed, Plan], None] | None = None


@dataclass
class _Canary:
    """Where the current canary step's figures come from, and since when."""

    key: tuple[str, int] | None = None
    source: FiguresSource | None = None
    started: datetime | None = None
    #: Whether the source's window was begun (the first read of a step only marks its start).
    begun: bool = False
    #: When the newest interval was judged: the next one is judged ``analysis.interval`` later.
    judged: datetime | None = None


@dataclass
class EmbeddedLoop:
    manifest: Path
    options: LoopOptions
    server: ServerProcess | None = None
    _canary: _Canary = field(default_factory=_Canary)
    _stop: threading.Event = field(default_factory=threading.Event)
    #: Set by ``stop()``: a ``forever`` loop returns at its next tick.
    _halt: threading.Event = field(default_factory=threading.Event)
    #: The model name while a canary runs (set by each tick): what the demo traffic asks for.
    _traffic_to: str | None = None

    def __post_init__(self) -> None:
        self.options.state_dir.mkdir(parents=True, exist_ok=True)
        self.state = LocalState(self.options.state_dir)
        self.pipelines = LocalPipelines(
            self.options.state_dir / "pipelines",
            extra_args=self.options.pipeline_args,
            env={URL_ENV: self.audit_url},  # the pipeline's GatePassed/GateFailed in the same ledger
        )
        self._lock: IO[str] | None = None
        self._pending: list[Path] = []

    @property
    def audit_url(self) -> str:
        return self.options.audit_url or f"sqlite:///{self.options.state_dir / 'audit.db'}"

    # -- state ------------------------------------------------------------------------------------

    def load(self) -> AutoGLMModel:
        model = load_manifest(str(self.manifest))
        return model.model_copy(update={"status": self.state.status() or AutoGLMModelStatus()})

    def save(self, status: AutoGLMModelStatus) -> None:
        self.state.save_status(status)

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
        pending = self.state.pending()
        self._pending = [path for path, _ in pending]
        intents = tuple(intent for _, intent in pending)
        return Observed(
            pipeline=run, serving=serving, analysis=analysis, intents=intents,
            memory_available=None if self.server is not None else _memory_available(),
        )  # fmt: skip

    def _serving(self, name: str) -> LocalServing:
        assert self.server is not None
        return LocalServing(name, self.server.url, headers=self.server.admin_headers)

    def _source(self) -> FiguresSource:
        assert self.server is not None
        if self.options.prometheus_url:
            return PrometheusSource(self.options.prometheus_url)
        return ScrapeSource(f"{self.server.url}/metrics")

    def _analyse(
        self, model: AutoGLMModel, candidate: str, step: int, stable: str | None, now: datetime
    ) -> Analysis | None:
        """The next interval's verdict, once ``analysis.interval`` has passed since the last one
        (None before: nothing new to judge). The figures are those since the step began."""
        name = model.metadata.name or ""
        limits = model.spec.rollout.analysis
        if self._canary.key != (candidate, step):  # a new step (or a restart): judge from here on
            self._canary = _Canary((candidate, step), source=self._source(), started=now)
        canary = self._canary
        assert canary.source is not None
        last = canary.judged or canary.started or now
        if (canary.begun or canary.judged is not None) and now - last < duration(limits.interval):
            return None
        got: dict[str, Figures | None] = {}
        try:
            if not canary.begun:
                canary.source.begin(now)
                canary.begun, canary.started = True, now  # the step's figures start here
                return None
            got = canary.source.read(name, [r for r in (candidate, stable) if r], now)
        except MetricsUnavailableError as exc:
            self.options.log(f"analysis: {exc}")
        canary.judged = now
        mine, theirs = got.get(candidate), got.get(stable) if stable else None
        result = judge(mine, theirs, limits)
        measured = {
            "stable": stable, "since": canary.started.isoformat() if canary.started else None,
            "source": canary.source.description, "queries": list(getattr(canary.source, "queries", [])),
            "candidateFigures": _figures_json(mine), "stableFigures": _figures_json(theirs),
        }  # fmt: skip
        self.state.save_analysis(
            {"revision": candidate, "step": step, "at": now.isoformat(), **measured, **result.to_json()}
        )
        return Analysis(candidate, step, now, result, measured)

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
                self._start_server(name, action.uri)
            elif self.server is not None:
                self._serving(name).apply(action)

    def record(self, model: AutoGLMModel, result: Plan) -> AutoGLMModelStatus:
        """Append the decisions (each once, by its key); the status with the newest as lastDecision."""
        status = result.status
        if result.decisions:
            namespace, name = model.metadata.namespace or "default", model.metadata.name or ""
            with Ledger(self.audit_url) as ledger:
                for d in result.decisions:
                    record = ledger.append(
                        namespace, name, d.kind, d.reason[:4000], revision=d.revision, actor=d.actor,
                        evidence=d.evidence, idempotency_key=d.idempotency_key[:255],
                    )  # fmt: skip
                    self.options.log(f"decision: {d.kind} {d.revision}: {d.reason}")
            status = status.model_copy(
                update={"last_decision": Decision(kind=record.decision, time=record.time,
                                                  audit_id=record.id, reason=record.reason[:32768])}
            )  # fmt: skip
        for intent, why in result.ignored:
            self.options.log(f"intent {intent.kind} from {intent.actor} changed nothing: {why}")
        self.state.done(self._pending, ignored={i.at.isoformat(): why for i, why in result.ignored})
        self._pending = []
        return status

    def _targets(self, model: AutoGLMModel, status: AutoGLMModelStatus) -> AutoGLMModelStatus:
        target = model.spec.targets[0].name if model.spec.targets else "local"
        server = self.server
        ready = server is not None and server.alive
        entry = TargetStatus(
            name=target, revision=status.revisions.stable, url=server.url if server else None,
            ready=ready, replicas=1 if ready else 0,
        )  # fmt: skip
        return status.model_copy(update={"targets": [entry]})

    def tick(self, now: datetime) -> tuple[AutoGLMModel, Plan]:
        if self.server is not None and not self.server.alive:
            self.options.log(f"the server exited ({self.server.process.returncode}): starting it again")
            self.server = None
            self._resume_server()
        model = self.load()
        observed = self.observe(model, now)
        result = plan(model, observed, now)
        self.act(model, result)
        result = dataclasses.replace(result, status=self._targets(model, self.record(model, result)))
        self.save(result.status)
        self._traffic_to = model.metadata.name if result.status.revisions.candidate else None
        if self.options.on_tick is not None:
            self.options.on_tick(model, observed, result)
        return model, result

    # -- the loop ---------------------------------------------------------------------------------

    def _traffic(self, client: int) -> None:
        """One demo client: a request every ``clients / traffic_rate`` seconds, so that all of them
        together send ``traffic_rate`` per second (or as many as the server answers), side by side
        as real clients would, which the server batches."""
        rng = random.Random(client)
        period = self.options.traffic_clients / self.options.traffic_rate
        while not self._stop.wait(period * (0.5 + rng.random())):
            server, name = self.server, self._traffic_to
            if server is None or name is None:
                continue
            body = {"model": name, "prompt": rng.choice(self.options.traffic_prompts), "max_tokens": 8}
            with contextlib.suppress(httpx.HTTPError):  # a swap or a stop in between: the next one
                httpx.post(f"{server.url}/openai/v1/completions", json=body, timeout=60)

    def _start_server(self, name: str, uri: str) -> None:
        self.server = ServerProcess(
            name, uri, *self.options.server_args,
            log=self.options.state_dir / "server.log", model_roots=[self.options.state_dir],
        ).wait_ready()  # fmt: skip
        self.state.set_server(self.server.url, self.server.process.pid)
        self.options.log(f"serving {name} at {self.server.url}")

    def _resume_server(self) -> None:
        """After a restart: serve the stable revision again (the canary is loaded by the next tick)."""
        model = self.load()
        stable = model.status.revisions.stable if model.status else None
        uri = self.pipelines.artifact(stable) if stable else None
        if self.server is None and uri:
            self.options.log(f"resuming: stable {stable} serves again")
            self._start_server(model.metadata.name or "", uri)

    def run(self) -> AutoGLMModelStatus:
        """Tick until ``until`` holds (or the timeout); the server keeps running in ``self.server``.
        ``forever`` ticks until interrupted (Ctrl-C, or ``stop()`` from another thread)."""
        if self._lock is None:
            model = load_manifest(str(self.manifest))
            self._lock = self.state.claim(model.namespaced_name, self.manifest)
            stale = self.state.stale_server()
            mine = self.server.process.pid if self.server is not None else None
            if stale is not None and stale != mine:  # left by a loop that was killed: start our own
                self.options.log(f"stopping the server (pid {stale}) a killed loop left running")
                self.state.stop_server(stale)
        self._resume_server()
        self._stop.clear()
        self._halt.clear()
        traffic = []
        if self.options.traffic_rate > 0:
            for client in range(self.options.traffic_clients):
                thread = threading.Thread(
                    target=self._traffic, args=(client,), name="autoglm-traffic", daemon=True
                )
                thread.start()
                traffic.append(thread)
        deadline = time.monotonic() + self.options.timeout_seconds
        try:
            while self.options.until == "forever" or time.monotonic() < deadline:
                model, result = self.tick(datetime.now(UTC))
                status = result.status
                if self.options.until != "forever" and self._reached(model, status):
                    return status
                if self._halt.wait(self.options.tick_seconds):
                    return status
            raise TimeoutError(
                f"{self.manifest}: not {self.options.until} after {self.options.timeout_seconds:.0f}s"
            )
        finally:
            self._stop.set()
            for thread in traffic:
                thread.join(5)
            if self._lock is not None:  # not ticking any more: `autoglm rollout` sees a stopped loop
                self.state.release(self._lock, server_kept=self.server is not None)
                self._lock = None

    def _reached(self, model: AutoGLMModel, status: AutoGLMModelStatus) -> bool:
        desired = artifact_revision(model.spec)
        if status.revisions.stable == desired and status.revisions.candidate is None:
            return True
        if status.revisions.rejected == desired:
            return True  # rolled back or failed: held until the manifest changes
        return self.options.until == "serving" and self.server is not None and bool(status.revisions.stable)

    def stop(self) -> None:
        """Make ``run()`` return at its next tick (from another thread)."""
        self._halt.set()

    def close(self) -> None:
        """Stop the server and the pipelines this loop started; the state stays for a resume."""
        self._stop.set()
        self.pipelines.close()
        if self.server is not None:
            self.server.stop()
            self.server = None
            self.state.clear_server()
        if self._lock is not None:
            self.state.release(self._lock)
            self._lock = None


def _memory_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _figures_json(f: Figures | None) -> dict[str, float | int | None] | None:
    if f is None:
        return None
    p95 = f.latency.quantile(0.95) if f.latency is not None and f.latency.total else None
    return {
        "requests": f.requests, "errors": f.errors, "p95LatencyMs": p95,
        "joulesPerToken": f.joules_per_token, "feedbackScore": f.feedback_score,
    }  # fmt: skip
