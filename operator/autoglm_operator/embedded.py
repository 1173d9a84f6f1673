"""The embedded loop (``autoglm run``): the reconcile core driven on this machine.

Every tick it observes the pipeline run of the revision being rolled out (``LocalPipelines``), what
the model server serves (``LocalServing``) and, during a canary, the figures of candidate and stable
since the step began (scraped from the server's ``/metrics``, judged by ``canary.judge``); asks
``plan()`` what to do; carries out the actions; appends the decisions to the audit ledger (each
under its idempotency key, so a restart never records one twice); and saves the status, so running
again resumes where it stopped. The server is started with the first promoted artifact.

Each target is one ``autoglm serve`` process on loopback, serving its precision's variant; they
are canaried together, judged at the same moments, each on its own server's figures. Demo
traffic at ``traffic_rate`` requests per second; manual intents (``autoglm rollout
promote|abort|retry``) read from the state directory (``backends.local_state``). The canary's
figures are the servers' own ``/metrics``, scraped here, or PromQL against a Prometheus that
scrapes them (``prometheus_url``; the servers are listed for it in
``STATE_DIR/prometheus-targets.json``). A first rollout serves the uncompressed source first, the
baseline its candidate is canaried against, when this machine and the targets' memory hold both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import threading
import time
from collections.abc import Callable, Sequence
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
from autoglm_core.variants import rollout_revision
from autoglm_inference.process import ServerProcess
from autoglm_operator.analysis import CanaryAnalyst
from autoglm_operator.backends.local_pipeline import LocalPipelines
from autoglm_operator.backends.local_serving import LocalServing
from autoglm_operator.backends.local_state import TARGET_LABEL, LocalState
from autoglm_operator.feedback_loop import FeedbackLoop, chat_answer
from autoglm_operator.metrics import FiguresSource, ScrapeSource
from autoglm_operator.plan import Analysis, DecisionRecord, Observed, Plan, Serving, TargetObserved, plan
from autoglm_operator.promql import PrometheusSource
from autoglm_operator.retraining import effective

Until = Literal["serving", "promoted", "policy", "retrained", "forever"]
#: ``policy``: promoted, and the prompt policy gives one variant at least this share of chat traffic.
POLICY_SETTLED = 0.8


@dataclass
class LoopOptions:
    state_dir: Path
    until: Until = "promoted"
    #: Requests per second of demo traffic while a canary runs (0: none, real clients send it).
    traffic_rate: float = 2.0
    #: Demo clients sending that traffic side by side (the server batches each revision's). One by
    #: default: with two on 2 cores, two engines in one server process contend (for the GIL too),
    #: and an int8 candidate measured 1.15x slower than its fp32 source instead of faster.
    traffic_clients: int = 1
    traffic_prompts: tuple[str, ...] = ("To be, or not to be", "The king", "Words, words, words")
    #: Simulated users (``short``: chat requests without a system prompt, so the server applies the
    #: policy's variant, each answer rated 1 - tokens/limit on POST /v1/feedback: they prefer short
    #: answers). They send traffic while serving too, not only during a canary. ``none``: no users.
    simulated_users: Literal["none", "short"] = "none"
    user_questions: tuple[str, ...] = (
        "What is Hamlet about?", "Who is Ophelia?", "Why does Hamlet hesitate?", "What is a soliloquy?",
        "Where is Elsinore?", "Who wrote Hamlet?",
    )  # fmt: skip
    user_max_tokens: int = 64
    #: An injected drift: after this many questions asked of a promoted revision serving alone (no
    #: canary, no baseline), the simulated users ask ``drift_questions`` instead (longer, on another
    #: topic). None: no drift.
    drift_after: int | None = None
    drift_questions: tuple[str, ...] = (
        "Can you explain how a hash table handles collisions, and when open addressing is better than chaining?",
        "What is the difference between a process and a thread in an operating system, and why does it matter?",
        "How does gradient descent find the minimum of a loss function when training a neural network?",
        "Why do databases use B-trees for their indexes instead of binary search trees?",
    )  # fmt: skip
    #: Requests in the drift reference window (and in the window compared with it); None: 500.
    drift_window: int | None = None
    #: OPRO: ask the served model for new system prompts (arms beside the spec's variants).
    propose_prompts: bool = False
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
class EmbeddedLoop:
    manifest: Path
    options: LoopOptions
    #: The running server of each target.
    servers: dict[str, ServerProcess] = field(default_factory=dict)
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
        self._analyst = CanaryAnalyst(self._source, log=self.options.log)
        self._pending: list[Path] = []
        self.feedback = FeedbackLoop(
            self.options.state_dir,
            say=self.options.log,
            ask=self._ask if self.options.propose_prompts else None,
            drift_window=self.options.drift_window,
            datasets=(self.options.state_dir / "datasets").resolve().as_uri(),
        )
        #: Questions the simulated users asked of a promoted revision serving alone (``drift_after``).
        self.asked_alone = 0
        self._alone = False
        #: Feedback events the simulated users had accepted.
        self.rated = 0

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

    @property
    def server(self) -> ServerProcess | None:
        """The first target's server (the only one, for a model with one target)."""
        return next(iter(self.servers.values()), None)

    @staticmethod
    def _names(model: AutoGLMModel) -> list[str]:
        return [t.name for t in model.spec.targets]

    def observe(self, model: AutoGLMModel, now: datetime) -> Observed:
        status = model.status or AutoGLMModelStatus()
        building = status.revisions.candidate or rollout_revision(model.spec)
        run = self.pipelines.observe(building)
        name = model.metadata.name or ""
        serving = {
            t: self._serving(name, t).observe() if t in self.servers else Serving()
            for t in self._names(model)
        }
        analyses = self._analyse(model, status, serving, now)
        pending = self.state.pending()
        self._pending = [path for path, _ in pending]
        intents = tuple(intent for _, intent in pending)
        return Observed(
            pipeline=run, intents=intents,
            targets={t: TargetObserved(serving[t], analyses.get(t)) for t in serving},
            memory_available=None if self.servers else _memory_available(),
        )  # fmt: skip

    def _serving(self, name: str, target: str) -> LocalServing:
        server = self.servers[target]
        return LocalServing(name, server.url, headers=server.admin_headers)

    def _source(self, target: str) -> FiguresSource:
        if self.options.prometheus_url:
            return PrometheusSource(self.options.prometheus_url, selector=f'{TARGET_LABEL}="{target}"')
        return ScrapeSource(f"{self.servers[target].url}/metrics")

    def _analyse(
        self, model: AutoGLMModel, status: AutoGLMModelStatus, serving: dict[str, Serving], now: datetime
    ) -> dict[str, Analysis]:
        """Every target's next interval verdict (``analysis.CanaryAnalyst``), each on its own server's
        figures; what was measured is saved for ``autoglm rollout status``."""
        live = {
            t.name: (t.candidate, t.revision)
            for t in status.targets
            if t.candidate and t.name in self.servers and serving.get(t.name, Serving()).canary == t.candidate
        }
        name = model.metadata.name or ""
        servers = {t: self.servers[t].url for t in live}
        analyses, saved = self._analyst.analyse(
            model.spec.rollout.analysis, status, live, servers, lambda _target: name, now
        )
        if saved:
            first = saved[next(iter(saved))]
            self.state.save_analysis({**first, **({"targets": saved} if len(saved) > 1 else {})})
        return analyses

    def act(self, model: AutoGLMModel, result: Plan) -> None:
        name = model.metadata.name or ""
        names = self._names(model)
        for action in result.actions:
            target = action.target or names[0]
            where = f" on {target}" if len(names) > 1 and action.kind != "StartPipeline" else ""
            self.options.log(
                f"action: {action.kind} {action.revision}{where}"
                + (f" {action.weight}%" if action.weight is not None else "")
            )
            if action.kind == "StartPipeline":
                self.pipelines.start(model, action)
            elif action.kind == "Promote" and target not in self.servers:
                if not action.uri:
                    raise RuntimeError(f"Promote {action.revision} on {target}: no artifact to serve")
                self._start_server(name, target, action.uri)
            elif target in self.servers:
                self._serving(name, target).apply(action)
            else:  # its server failed to start: the next tick plans again from what is served
                self.options.log(f"skipped {action.kind} {action.revision}: no server runs for {target}")

    def record(self, model: AutoGLMModel, result: Plan) -> AutoGLMModelStatus:
        """Append the decisions (each once, by its key); the status with the newest as lastDecision."""
        status = self.append(model, result.status, result.decisions)
        for intent, why in result.ignored:
            self.options.log(f"intent {intent.kind} from {intent.actor} changed nothing: {why}")
        self.state.done(self._pending, ignored={i.at.isoformat(): why for i, why in result.ignored})
        self._pending = []
        return status

    def append(
        self, model: AutoGLMModel, status: AutoGLMModelStatus, decisions: Sequence[DecisionRecord]
    ) -> AutoGLMModelStatus:
        """Append ``decisions`` to the ledger, each once (by its key); the status with the newest as
        lastDecision."""
        if not decisions:
            return status
        namespace, name = model.metadata.namespace or "default", model.metadata.name or ""
        with Ledger(self.audit_url) as ledger:
            for d in decisions:
                record = ledger.append(
                    namespace, name, d.kind, d.reason[:4000], revision=d.revision, actor=d.actor,
                    evidence=d.evidence, idempotency_key=d.idempotency_key[:255],
                )  # fmt: skip
                self.options.log(f"decision: {d.kind} {d.revision}: {d.reason}")
        return status.model_copy(
            update={"last_decision": Decision(kind=record.decision, time=record.time,
                                              audit_id=record.id, reason=record.reason[:32768])}
        )  # fmt: skip

    def _targets(self, model: AutoGLMModel, status: AutoGLMModelStatus) -> AutoGLMModelStatus:
        """Each target's entry (its revisions from the plan) with its server's URL and readiness."""
        known = {t.name: t for t in status.targets}
        entries = []
        for target in self._names(model):
            server = self.servers.get(target)
            ready = server is not None and server.alive
            entry = known.get(target) or TargetStatus(name=target, revision=status.revisions.stable)
            entries.append(entry.model_copy(update={
                "url": server.url if server else None, "ready": ready, "replicas": 1 if ready else 0,
            }))  # fmt: skip
        return status.model_copy(update={"targets": entries})

    def tick(self, now: datetime) -> tuple[AutoGLMModel, Plan]:
        died = [t for t, server in self.servers.items() if not server.alive]
        for target in died:
            code = self.servers.pop(target).process.returncode
            self.options.log(f"the server of {target} exited ({code}): starting it again")
            self.state.clear_server(target)
        if died:
            self._resume_servers()
        manifest = self.load()
        model = effective(manifest)  # a retraining revision's fine-tune (status.retraining) added
        observed = self.observe(model, now)
        result = plan(model, observed, now)
        self.act(model, result)
        status = self._targets(model, self.record(model, result))
        if self.servers:
            status, decisions = self.feedback.tick(model, status, now)
            status = self.append(model, status, decisions)
            status, decisions = self.feedback.retrain(manifest, status, now, self._artifact_uri)
            status = self.append(model, status, decisions)
        result = dataclasses.replace(result, status=status)
        self.save(result.status)
        revisions = result.status.revisions
        self._alone = bool(revisions.stable) and revisions.candidate is None and revisions.baseline is None
        users = self.options.simulated_users != "none" and bool(result.status.revisions.stable)
        self._traffic_to = model.metadata.name if result.status.revisions.candidate or users else None
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
            servers, name = list(self.servers.values()), self._traffic_to
            if not servers or name is None:
                continue
            server = rng.choice(servers)  # each target's clients
            with contextlib.suppress(httpx.HTTPError):  # a swap or a stop in between: the next one
                if self.options.simulated_users == "short":
                    self._user(rng, server.url, name)
                    continue
                body = {"model": name, "prompt": rng.choice(self.options.traffic_prompts), "max_tokens": 8}
                httpx.post(f"{server.url}/openai/v1/completions", json=body, timeout=60)

    def _ask(self, model: AutoGLMModel, messages: list[dict[str, str]]) -> str:
        """The served model's answer to ``messages`` (a proposal's meta-prompt), from the first
        target's server."""
        server = self.server
        if server is None:
            raise RuntimeError("no server runs to ask")
        return chat_answer(server.url, model.metadata.name or "", messages, timeout=120)

    def _user(self, rng: random.Random, url: str, name: str) -> None:
        """One simulated user: a chat question, then a rating that prefers short answers."""
        limit = self.options.user_max_tokens
        self.asked_alone += self._alone
        drifted = self.options.drift_after is not None and self.asked_alone > self.options.drift_after
        questions = self.options.drift_questions if drifted else self.options.user_questions
        body = {"model": name, "max_tokens": limit,
                "messages": [{"role": "user", "content": rng.choice(questions)}]}  # fmt: skip
        answer = httpx.post(f"{url}/openai/v1/chat/completions", json=body, timeout=120)
        if answer.status_code != 200:
            return
        tokens = int(answer.json()["usage"]["completion_tokens"])
        rating = {"request_id": answer.headers["x-request-id"], "score": round(max(0.0, 1.0 - tokens / limit), 4),
                  "source": "simulated-user"}  # fmt: skip
        if httpx.post(f"{url}/v1/feedback", json=rating, timeout=30).status_code == 200:
            self.rated += 1

    def _artifact_uri(self, revision: str) -> str | None:
        """Where ``revision`` was published, as a URI (what a retraining revision is judged against)."""
        found = self.pipelines.artifact(revision)
        return Path(found).resolve().as_uri() if found else None

    def _start_server(self, name: str, target: str, uri: str) -> None:
        log = self.options.state_dir / f"server-{target}.log"
        feedback = self.feedback.server_args(load_manifest(str(self.manifest)))
        server = ServerProcess(
            name, uri, *self.options.server_args, *feedback, log=log, model_roots=[self.options.state_dir],
        ).wait_ready()  # fmt: skip
        self.servers[target] = server
        self.state.set_server(target, server.url, server.process.pid)
        self.options.log(f"serving {name} on {target} at {server.url}")

    def _resume_servers(self) -> None:
        """After a restart: each target serves its stable revision again (a canary is loaded by the
        next tick)."""
        model = self.load()
        status = model.status or AutoGLMModelStatus()
        known = {t.name: t.revision for t in status.targets}
        for target in self._names(model):
            if target in self.servers:
                continue
            stable = known.get(target) or status.revisions.stable
            uri = self.pipelines.artifact(stable) if stable else None
            if uri:
                self.options.log(f"resuming: {stable} serves again on {target}")
                self._start_server(model.metadata.name or "", target, uri)

    def run(self) -> AutoGLMModelStatus:
        """Tick until ``until`` holds (or the timeout); the servers keep running in ``self.servers``.
        ``forever`` ticks until interrupted (Ctrl-C, or ``stop()`` from another thread)."""
        if self._lock is None:
            model = load_manifest(str(self.manifest))
            self._lock = self.state.claim(model.namespaced_name, self.manifest)
            mine = {s.process.pid for s in self.servers.values()}
            for stale in self.state.stale_servers():
                if stale not in mine:  # left by a loop that was killed: start our own
                    self.options.log(f"stopping the server (pid {stale}) a killed loop left running")
                    self.state.stop_server(stale)
            if not mine:
                self.state.clear_server()
        self._resume_servers()
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
                self.state.release(self._lock, server_kept=bool(self.servers))
                self._lock = None

    def _reached(self, model: AutoGLMModel, status: AutoGLMModelStatus) -> bool:
        until = self.options.until
        desired = rollout_revision(model.spec)
        settled = status.revisions.stable == desired and status.revisions.candidate is None
        if settled and until in ("serving", "promoted"):
            return True
        if status.revisions.rejected == desired:
            return True  # rolled back or failed: held until the manifest changes
        if until == "policy":
            policy = status.prompt_policy
            return (
                settled and policy is not None and max(policy.shares.values(), default=0.0) >= POLICY_SETTLED
            )
        if until == "retrained":  # a retraining revision was triggered, and promoted or rejected
            retraining = status.retraining
            return (
                retraining is not None and retraining.triggered_at is not None and retraining.candidate is None
                and status.revisions.candidate is None
            )  # fmt: skip
        return until == "serving" and bool(self.servers) and bool(status.revisions.stable)

    def stop(self) -> None:
        """Make ``run()`` return at its next tick (from another thread)."""
        self._halt.set()

    def close(self) -> None:
        """Stop the server and the pipelines this loop started; the state stays for a resume."""
        self._stop.set()
        self.pipelines.close()
        for server in self.servers.values():
            server.stop()
        if self.servers:
            self.servers.clear()
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
