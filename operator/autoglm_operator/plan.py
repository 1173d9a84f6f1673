"""The reconcile core: ``plan(model, observed, now) -> Plan``. Pure: no I/O, no clock reads.

From the AutoGLMModel (spec, status) and what the backends observed (the pipeline run of the
revision the spec asks for, what each target serves, each target's newest canary analysis, manual
intents),
it returns the actions to take, the new status and the decisions for the audit ledger, each with
its evidence and an idempotency key (model, revision, step, kind), so a decision is recorded once
even when the process dies between acting and recording. The embedded loop (``autoglm run``) and
the kopf operator both drive it.

It covers: revisions content-addressed (one rollout id over each target's revision, the
variant of its precision, ``autoglm_core.variants``), a new candidate while stable keeps serving,
a candidate superseded by a newer spec, the pipeline's and the gates' failures, canary steps
advanced on Successful analyses after their pause, held on Inconclusive ones, rolled back at
``failureLimit`` Failed ones, promotion after the last step, the manual intents promote, abort and
retry, and the first rollout: its candidate is canaried against the uncompressed source, served
first as the baseline, where the targets can hold both (the memory they need is checked against
each target's and the machine's), else it goes to 100% on its offline gates alone; the ledger
says which and why. Several targets are one rollout: one canary step and weight on each target
whose revision changes, every such target judged before a step advances, a failed interval on
any of them rolls back all of them, and all are promoted together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from autoglm_api.base import quantity_value
from autoglm_api.resource import AutoGLMModel
from autoglm_api.spec import CanaryStep
from autoglm_api.status import AutoGLMModelStatus, CanaryStatus, TargetStatus
from autoglm_core.audit import (
    CANARY_ADVANCED,
    GATE_FAILED,
    MANUAL_OVERRIDE,
    PIPELINE_STARTED,
    PROMOTED,
    ROLLED_BACK,
)
from autoglm_core.variants import rollout_revision, target_revisions
from autoglm_operator.canary import AnalysisResult

PipelinePhase = Literal["Running", "Succeeded", "Failed"]
IntentKind = Literal["promote", "abort", "retry"]

# Decision kinds besides the ledger's known ones (PipelineStarted, Promoted, ...).
PIPELINE_FAILED = "PipelineFailed"
CANARY_STARTED = "CanaryStarted"
CANARY_FAILED_INTERVAL = "CanaryIntervalFailed"
SUPERSEDED = "Superseded"
BASELINE_SERVED = "BaselineServed"

#: What serving a revision takes besides its weight files: the runtime (torch, the server) and
#: activations; the weights themselves are counted with a margin for what loading adds.
RUNTIME_BYTES = 512 * 2**20
WEIGHT_MARGIN = 1.25
#: A target's memory when its resources say nothing (the API's documented default).
DEFAULT_TARGET_MEMORY = "2Gi"


@dataclass(frozen=True)
class Published:
    """An artifact a pipeline run published besides its own: the uncompressed source (the baseline)."""

    revision: str
    uri: str
    weight_bytes: int | None = None


@dataclass(frozen=True)
class PipelineRun:
    """The pipeline run of one revision, as the pipeline backend observed it."""

    revision: str
    phase: PipelinePhase
    #: Set when it succeeded: whether every gate passed, and the published artifact.
    gates_passed: bool | None = None
    artifact_uri: str | None = None
    reason: str = ""
    #: Runs of this revision started so far (a retry starts the next one).
    attempt: int = 1
    #: Bytes of the artifact's weight files (how much serving it takes, about).
    artifact_bytes: int | None = None
    #: The uncompressed source, when the run published it (a first rollout's canary baseline).
    baseline: Published | None = None
    #: Every variant the run published (the spec's own first, then one per other target precision).
    variants: tuple[Published, ...] = ()


@dataclass(frozen=True)
class Serving:
    """What the target serves: the stable revision and the canary with its weight."""

    stable: str | None = None
    canary: str | None = None
    weight: int = 0


@dataclass(frozen=True)
class Analysis:
    """The newest judged interval of a canary: for which revision and step, and its result."""

    revision: str
    step: int
    at: datetime
    result: AnalysisResult
    #: How the figures were measured, for the ledger: the source, its queries, both revisions' figures.
    measured: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {**self.measured, **self.result.to_json()}


@dataclass(frozen=True)
class Intent:
    """A person's request, observed (an annotation in a cluster, a local command here)."""

    kind: IntentKind
    actor: str
    at: datetime
    revision: str | None = None


@dataclass(frozen=True)
class TargetObserved:
    """What one target serves, its newest judged canary interval, and the memory it has free."""

    serving: Serving = field(default_factory=Serving)
    analysis: Analysis | None = None
    #: Bytes the machine can give the target's server (None: unknown; its memory limit decides).
    memory_available: int | None = None


@dataclass(frozen=True)
class Observed:
    pipeline: PipelineRun | None = None
    #: The target's, for a model with one target (a shorthand for ``targets``).
    serving: Serving = field(default_factory=Serving)
    analysis: Analysis | None = None
    intents: tuple[Intent, ...] = ()
    #: Memory the machine can give the target's server (bytes; None: unknown, the target's limit
    #: alone decides). What "the target can hold both" is checked against on a first rollout.
    memory_available: int | None = None
    #: Per target name, for a model with several targets (each judged on its own server).
    targets: dict[str, TargetObserved] = field(default_factory=dict)


@dataclass(frozen=True)
class Action:
    """One thing for the backends to do; ``kind`` names it, the rest are its arguments."""

    kind: Literal["StartPipeline", "LoadCanary", "SetWeight", "Promote", "Unload"]
    revision: str
    weight: int | None = None
    uri: str | None = None
    attempt: int | None = None
    #: StartPipeline: publish the uncompressed source too (a first rollout canaries against it).
    baseline: bool = False
    #: The target a serving action is for ("" for StartPipeline).
    target: str = ""


@dataclass(frozen=True)
class DecisionRecord:
    kind: str
    revision: str
    reason: str
    actor: str = "operator"
    evidence: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str = ""


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    status: AutoGLMModelStatus
    decisions: tuple[DecisionRecord, ...]
    #: Intents that changed nothing, each with why (told to whoever asked; not ledger decisions).
    ignored: tuple[tuple[Intent, str], ...] = ()


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(text: str) -> timedelta:
    """``1h30m``, ``5m``, ``250ms``: the API's duration strings."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"duration {text!r}: use numbers with ms, s, m or h, e.g. 30s, 5m, 1h30m")
    return timedelta(seconds=sum(float(n) * _UNIT[u] for n, u in parts))


class _Planner:
    def __init__(self, model: AutoGLMModel, observed: Observed, now: datetime) -> None:
        self.model, self.observed, self.now = model, observed, now
        self.status = (model.status or AutoGLMModelStatus()).model_copy(deep=True)
        self.actions: list[Action] = []
        self.decisions: list[DecisionRecord] = []
        self.ignored: list[tuple[Intent, str]] = []
        self.name = model.namespaced_name

    # -- helpers --------------------------------------------------------------------------------

    def decide(self, kind: str, revision: str, reason: str, *, step: int | str = "-", **extra: Any) -> None:
        actor = str(extra.pop("actor", "operator"))
        run = self.observed.pipeline
        attempt = run.attempt if run is not None and run.revision == revision else 1
        # The attempt keeps a retried revision's decisions apart from its earlier attempt's.
        key = f"{self.name}:{revision}@{attempt}:{step}:{kind}"
        self.decisions.append(DecisionRecord(kind, revision, reason, actor, extra, key))

    @property
    def steps(self) -> list[CanaryStep]:
        rollout = self.model.spec.rollout
        return [] if rollout.strategy == "immediate" else list(rollout.steps)

    def set_revisions(self, **changes: str | None) -> None:
        self.status.revisions = self.status.revisions.model_copy(update=changes)

    def end_canary(self) -> None:
        self.status.canary = CanaryStatus()

    @property
    def first_rollout(self) -> bool:
        """Nothing stable yet and a canary asked for: the candidate is compared with the source."""
        return self.status.revisions.stable is None and bool(self.steps)

    @property
    def wants_baseline(self) -> bool:
        """Whether a pipeline run publishes the source too: on a first rollout, and while the source
        serves (a rolled-back first candidate), so that a retry, which redoes publish, keeps it."""
        revisions = self.status.revisions
        return self.first_rollout or (
            revisions.baseline is not None and revisions.baseline == revisions.stable
        )

    # -- targets --------------------------------------------------------------------------------

    @property
    def target_names(self) -> list[str]:
        return [t.name for t in self.model.spec.targets]

    def seen(self, target: str) -> TargetObserved:
        """What was observed of ``target`` (the shorthand fields for a model with one target)."""
        if target in self.observed.targets:
            return self.observed.targets[target]
        if len(self.target_names) <= 1:
            o = self.observed
            return TargetObserved(o.serving, o.analysis, o.memory_available)
        return TargetObserved()

    def entry(self, target: str) -> TargetStatus:
        """``target``'s status entry, added when missing (what a status from before had: stable)."""
        for item in self.status.targets:
            if item.name == target:
                return item
        item = TargetStatus(name=target, revision=self.status.revisions.stable)
        self.status.targets = [*self.status.targets, item]
        return item

    def set_target(self, target: str, **changes: str | None) -> None:
        updated = self.entry(target).model_copy(update=changes)
        self.status.targets = [updated if t.name == target else t for t in self.status.targets]

    def stable_on(self, target: str) -> str | None:
        return self.entry(target).revision

    def wanted(self, candidate: str, run: PipelineRun | None) -> dict[str, tuple[str, str | None]]:
        """Per target: the candidate's revision there (its precision's variant) and its artifact."""
        names = self.target_names
        revisions = (
            target_revisions(self.model.spec)
            if candidate == rollout_revision(self.model.spec)
            else {t: self.entry(t).candidate or self.entry(t).revision or candidate for t in names}
        )
        uris = {v.revision: v.uri for v in run.variants} if run is not None else {}
        if run is not None and run.artifact_uri:
            uris.setdefault(run.revision, run.artifact_uri)
        return {t: (revisions.get(t, candidate), uris.get(revisions.get(t, candidate))) for t in names}

    def room_for_both(self, run: PipelineRun, target: str) -> tuple[bool, dict[str, Any]]:
        """Whether ``target`` can serve the baseline and its candidate side by side, with the figures."""
        assert run.baseline is not None
        spec = next(t for t in self.model.spec.targets if t.name == target)
        memory = spec.resources.memory or DEFAULT_TARGET_MEMORY
        limit = int(quantity_value(memory))
        revision, _ = self.wanted(run.revision, run)[target]
        sizes = {v.revision: v.weight_bytes for v in run.variants}
        candidate_bytes = sizes.get(revision) or (run.artifact_bytes if revision == run.revision else None)
        weights = (run.baseline.weight_bytes or 0) + (candidate_bytes or 0)
        needed = int(weights * WEIGHT_MARGIN) + RUNTIME_BYTES
        available = self.seen(target).memory_available
        if available is None:
            available = self.observed.memory_available
        fits = needed <= limit and (available is None or needed <= available)
        figures = {"neededBytes": needed, "targetMemory": memory, "targetMemoryBytes": limit,
                   "availableBytes": available, "baselineBytes": run.baseline.weight_bytes,
                   "candidateBytes": candidate_bytes}  # fmt: skip
        return fits, figures

    def baseline_room(self, run: PipelineRun) -> tuple[bool, Any, str]:
        """Whether every target can hold the source and its candidate, the figures, and else why not.
        Targets that share this machine (no memory observed per target) share its free memory."""
        rooms = {t: self.room_for_both(run, t) for t in self.target_names}
        memory: Any = (
            next(iter(rooms.values()))[1] if len(rooms) == 1 else {t: r for t, (_, r) in rooms.items()}
        )
        for target, (fits, room) in rooms.items():
            if not (room["baselineBytes"] and room["candidateBytes"]):
                return (
                    False,
                    memory,
                    (
                        "the pipeline did not report the weight bytes of the source and the candidate, so "
                        "whether a target holds both is unknown"
                    ),
                )
            if not fits:
                where = f"target {target}" if len(rooms) > 1 else "the target"
                return False, memory, (
                    f"{where} cannot hold the source and the candidate together ({_gib(room['neededBytes'])} "
                    f"needed, the target has {room['targetMemory']}, the machine {_gib(room['availableBytes'])} "
                    "available)"
                )  # fmt: skip
        shared = self.observed.memory_available
        together = sum(room["neededBytes"] for _, room in rooms.values())
        own = any(o.memory_available is not None for o in self.observed.targets.values())
        if len(rooms) > 1 and shared is not None and not own and together > shared:
            return (
                False,
                memory,
                (
                    f"the {len(rooms)} targets on this machine cannot hold the source and their candidates together "
                    f"({_gib(together)} needed, {_gib(shared)} available)"
                ),
            )
        return True, memory, ""

    def pause_of(self, step: int) -> timedelta:
        pause = self.steps[step].pause or self.model.spec.rollout.analysis.interval
        return duration(pause)

    # -- the plan -------------------------------------------------------------------------------

    def run(self) -> Plan:
        desired = rollout_revision(self.model.spec)
        revisions = self.status.revisions
        if self._intents(desired):
            return self._plan()
        if desired == revisions.stable and revisions.candidate is None:
            self.status.phase = "Serving"
            return self._plan()
        if revisions.candidate is not None and revisions.candidate != desired:
            self._supersede(revisions.candidate, desired)
        if desired == self.status.revisions.rejected:
            self.status.phase = "Serving" if self.status.revisions.stable else "Failed"
            return self._plan()  # held until the spec changes or a retry is asked for
        new = self.status.revisions.candidate is None and desired != self.status.revisions.stable
        if new:
            self.set_revisions(candidate=desired)
        candidate = self.status.revisions.candidate
        if candidate is not None:
            self._advance(candidate, new)
        return self._plan()

    def _plan(self) -> Plan:
        self.status.observed_generation = self.model.metadata.generation
        return Plan(tuple(self.actions), self.status, tuple(self.decisions), tuple(self.ignored))

    def _supersede(self, old: str, new: str) -> None:
        for target, (revision, _) in self.wanted(old, None).items():
            if self.seen(target).serving.canary == revision:
                self.actions += [Action("SetWeight", revision, weight=0, target=target),
                                 Action("Unload", revision, target=target)]  # fmt: skip
            self.set_target(target, candidate=None)
        self.decide(SUPERSEDED, old, f"the spec now asks for revision {new}", replaced_by=new)
        self.set_revisions(candidate=None)
        self.end_canary()

    def _advance(self, candidate: str, new: bool) -> None:
        run = self.observed.pipeline
        if run is None or run.revision != candidate:
            self.status.phase = "Compressing"
            self.actions.append(Action("StartPipeline", candidate, attempt=1, baseline=self.wants_baseline))
            self.decide(
                PIPELINE_STARTED, candidate, "the spec asks for a revision not built yet", step="attempt-1"
            )
            return
        if new and run.attempt == 1:
            # Started by a process that died before it saved the candidate: record the start again
            # (the same key: the ledger keeps the first record if there was one).
            self.decide(
                PIPELINE_STARTED, candidate, "the spec asks for a revision not built yet", step="attempt-1"
            )
        if run.phase == "Running":
            self.status.phase = "Compressing"
            return
        if run.phase == "Failed" or run.gates_passed is False:
            kind = PIPELINE_FAILED if run.phase == "Failed" else GATE_FAILED
            if kind == PIPELINE_FAILED:  # the pipeline records the gates' verdict itself
                self.decide(
                    kind, candidate, run.reason or "the pipeline failed", step=f"attempt-{run.attempt}"
                )
            self._reject(candidate)
            return
        self._rollout(candidate, run)

    def _reject(self, candidate: str) -> None:
        self.set_revisions(candidate=None, rejected=candidate)
        for target in self.target_names:
            self.set_target(target, candidate=None)
        self.end_canary()
        self.status.phase = "Serving" if self.status.revisions.stable else "Failed"

    def _rollout(self, candidate: str, run: PipelineRun) -> None:
        canary = self.status.canary
        stable = self.status.revisions.stable
        if stable is None and self.steps and self._serve_baseline(candidate, run):
            return
        if stable is None or not self.steps:  # nothing to compare with, or no canary asked for
            if stable is not None:
                why, how = "rollout strategy immediate: offline gates alone", "immediate"
            elif run.baseline is None:
                why = (
                    "first rollout: offline gates alone (the pipeline published no baseline to compare with)"
                )
                how = "offline-gates"
            else:
                _, _, lacking = self.baseline_room(run)
                why = f"first rollout: offline gates alone: {lacking}"
                how = "offline-gates"
            self._promote(candidate, why, run=run, firstRollout=how if stable is None else None)
            return
        self.status.phase = "RollingOut"
        # Targets whose revision does not change (another target's precision did) take no part.
        wanted = {t: w for t, w in self.wanted(candidate, run).items() if w[0] != self.stable_on(t)}
        if not wanted:
            self._promote(candidate, "no target's revision changes: nothing to canary", run=run)
            return
        if canary.step is None:
            # A new canary, or one whose start a restart did not save (then it may be loaded already;
            # its decision has the same key, so the ledger keeps one record). Not before every target
            # serves its stable revision (a first rollout's source, just promoted): the candidate is
            # compared with what serves, and in a cluster the agents load it only after it serves.
            if any(self.seen(t).serving.stable != self.stable_on(t) for t in wanted):
                return
            weight = self.steps[0].weight
            self.status.canary = CanaryStatus(step=0, weight=weight, step_started_at=self.now)
            against = "baseline" if stable == self.status.revisions.baseline else "stable"
            self.decide(CANARY_STARTED, candidate, f"canary at {weight}% against {against} {stable}",
                        step=0, against=against, stable=stable, **self._per_target(wanted))  # fmt: skip
            self._place(wanted, weight)
            return
        step = canary.step
        if self._place(wanted, self.steps[step].weight):
            return  # loaded again (a server restarted): judged from the next interval on
        started = canary.step_started_at or self.now
        analyses: dict[str, Analysis] = {}
        for target, (revision, _) in wanted.items():
            analysis = self.seen(target).analysis
            if (
                analysis is None
                or analysis.revision != revision
                or analysis.step != step
                or analysis.at < started
            ):
                return  # not every target judged at this step yet: hold
            analyses[target] = analysis
        limits = self.model.spec.rollout.analysis
        failed = [(t, a) for t, a in analyses.items() if a.result.outcome == "Failed"]
        newest = max(a.at for a in analyses.values())
        if failed:
            deciding = failed[0][1]
            reason = "; ".join(self._reason(t, a) for t, a in failed)  # every target that failed
            failures = canary.failures + 1
            self.status.canary = canary.model_copy(update={"failures": failures})
            self.decide(
                CANARY_FAILED_INTERVAL, candidate, reason, step=f"{step}@{newest.isoformat()}",
                **self._evidence(deciding, analyses),
            )  # fmt: skip
            if failures >= max(limits.failure_limit, 1):
                self._rollback(candidate, f"{failures} failed analysis intervals: {reason}", run=run,
                               **self._evidence(deciding, analyses))  # fmt: skip
            return
        if any(a.result.outcome == "Inconclusive" for a in analyses.values()):
            return  # hold the weight; never promote on missing data
        if self.now - started < self.pause_of(step):
            return  # the step's pause has not passed
        first = next(iter(analyses.values()))
        if step + 1 >= len(self.steps):
            self._promote(candidate, f"every canary step passed its analysis (last: {first.result.reason})",
                          run=run, **self._evidence(first, analyses))  # fmt: skip
            return
        weight = self.steps[step + 1].weight
        self.status.canary = CanaryStatus(
            step=step + 1, weight=weight, failures=canary.failures, step_started_at=self.now
        )
        for target, (revision, _) in wanted.items():
            self.actions.append(Action("SetWeight", revision, weight=weight, target=target))
        self.decide(CANARY_ADVANCED, candidate, f"canary to {weight}%", step=step + 1,
                    **self._evidence(first, analyses))  # fmt: skip

    def _place(self, wanted: dict[str, tuple[str, str | None]], weight: int) -> bool:
        """Each target's candidate loaded at ``weight`` (loaded when a server lacks it, e.g. after
        its restart; re-weighted when a restart came between acting and saving). True when any
        had to be loaded."""
        loaded = False
        for target, (revision, uri) in wanted.items():
            self.set_target(target, candidate=revision)
            serving = self.seen(target).serving
            if serving.canary != revision:
                self.actions.append(Action("LoadCanary", revision, weight=weight, uri=uri, target=target))
                loaded = True
            elif serving.weight != weight:
                self.actions.append(Action("SetWeight", revision, weight=weight, target=target))
        return loaded

    def _reason(self, target: str, analysis: Analysis) -> str:
        where = f"target {target}: " if len(self.target_names) > 1 else ""
        return where + analysis.result.reason

    def _evidence(self, deciding: Analysis, analyses: dict[str, Analysis]) -> dict[str, Any]:
        """The deciding analysis, and with several targets every target's."""
        evidence: dict[str, Any] = {"analysis": deciding.to_json()}
        if len(analyses) > 1:
            evidence["analyses"] = {t: a.to_json() for t, a in analyses.items()}
        return evidence

    def _per_target(self, wanted: dict[str, tuple[str, str | None]]) -> dict[str, Any]:
        """Each target's revision, in the evidence of a rollout over several targets."""
        if len(wanted) <= 1:
            return {}
        return {"targets": {t: revision for t, (revision, _) in wanted.items()}}

    def _serve_baseline(self, candidate: str, run: PipelineRun) -> bool:
        """A first rollout: serve the uncompressed source as stable on every target, so the candidate
        is canaried against it; False (offline gates alone) when none was published or a target
        lacks the room for both."""
        if run.baseline is None:
            return False
        fits, memory, _ = self.baseline_room(run)
        if not fits:
            return False
        baseline = run.baseline.revision
        for target in self.target_names:
            self.actions.append(Action("Promote", baseline, uri=run.baseline.uri, target=target))
            self.set_target(target, revision=baseline)
        self.decide(
            BASELINE_SERVED, baseline,
            f"first rollout: the uncompressed source serves as the baseline; candidate {candidate} is "
            f"canaried against it on live traffic", step=f"for-{candidate}",
            candidate=candidate, firstRollout="canary-against-baseline", memory=memory,
        )  # fmt: skip
        self.set_revisions(stable=baseline, baseline=baseline)
        self.status.phase = "RollingOut"
        return True

    def _promote(self, candidate: str, reason: str, *, actor: str = "operator",
                 run: PipelineRun | None = None, **evidence: Any) -> None:  # fmt: skip
        wanted = self.wanted(candidate, run)
        previous = self.status.revisions.stable
        for target, (revision, uri) in wanted.items():
            before = self.stable_on(target)
            if before != revision:  # an unchanged target keeps serving what it serves
                self.actions.append(Action("Promote", revision, uri=uri, target=target))
                if before is not None:
                    self.actions.append(Action("Unload", before, target=target))
            self.set_target(target, revision=revision, candidate=None)
        if previous is not None and previous == self.status.revisions.baseline:
            evidence["against"] = "baseline"
        evidence.update(self._per_target(wanted))
        self.decide(PROMOTED, candidate, reason, actor=actor, previous=previous,
                    **{k: v for k, v in evidence.items() if v is not None})  # fmt: skip
        self.set_revisions(stable=candidate, candidate=None, baseline=None)
        self.end_canary()
        self.status.phase = "Serving"

    def _rollback(self, candidate: str, reason: str, *, actor: str = "operator",
                  run: PipelineRun | None = None, **evidence: Any) -> None:  # fmt: skip
        for target, (revision, _) in self.wanted(candidate, run).items():
            if self.seen(target).serving.canary == revision:
                self.actions += [Action("SetWeight", revision, weight=0, target=target),
                                 Action("Unload", revision, target=target)]  # fmt: skip
        stable = self.status.revisions.stable
        if stable is not None and stable == self.status.revisions.baseline:
            reason += f"; the uncompressed source {stable} keeps serving"
        self.decide(ROLLED_BACK, candidate, reason, actor=actor, stable=stable, **evidence)
        self._reject(candidate)

    def _intents(self, desired: str) -> bool:
        """Apply manual intents (newest last); True when one decided this reconcile."""
        acted = False
        for intent in self.observed.intents:
            candidate = self.status.revisions.candidate
            target = intent.revision or candidate or desired
            step = f"intent@{intent.at.isoformat()}"
            if intent.kind in ("promote", "abort") and (candidate is None or target != candidate):
                what = f"revision {target}" if intent.revision else "a candidate"
                self.ignored.append((intent, f"{intent.kind}: there is no {what} being rolled out "
                                             f"(candidate: {candidate or 'none'})"))  # fmt: skip
            elif intent.kind == "promote":
                assert candidate is not None
                run = self.observed.pipeline
                if run is None or run.revision != candidate or run.gates_passed is not True:
                    self.ignored.append(
                        (intent, f"promote: {candidate} has not passed its pipeline and gates yet")
                    )
                    continue  # only a validated candidate can be promoted by hand
                self.decide(MANUAL_OVERRIDE, candidate, f"promote asked by {intent.actor}", step=step,
                            actor=intent.actor, intent="promote")  # fmt: skip
                self._promote(candidate, f"promoted by {intent.actor}", actor=intent.actor, run=run)
                acted = True
            elif intent.kind == "abort":
                assert candidate is not None
                self.decide(MANUAL_OVERRIDE, candidate, f"abort asked by {intent.actor}", step=step,
                            actor=intent.actor, intent="abort")  # fmt: skip
                self._rollback(
                    candidate, f"aborted by {intent.actor}", actor=intent.actor, run=self.observed.pipeline
                )
                acted = True
            elif intent.kind == "retry" and self.status.revisions.rejected == target == desired:
                attempt = (self.observed.pipeline.attempt + 1) if self.observed.pipeline else 1
                self.decide(MANUAL_OVERRIDE, target, f"retry asked by {intent.actor}", step=step,
                            actor=intent.actor, intent="retry")  # fmt: skip
                self.set_revisions(rejected=None, candidate=target)
                self.status.phase = "Compressing"
                self.actions.append(
                    Action("StartPipeline", target, attempt=attempt, baseline=self.wants_baseline)
                )
                acted = True
            elif intent.kind == "retry":
                rejected = self.status.revisions.rejected
                why = (f"retry: {target} is not the rejected revision the manifest asks for "
                       f"(rejected: {rejected or 'none'}, manifest: {desired})")  # fmt: skip
                self.ignored.append((intent, why))
        return acted


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.2f} GiB"


def plan(model: AutoGLMModel, observed: Observed, now: datetime) -> Plan:
    """The actions, the new status and the decisions for ``model`` given what was ``observed``."""
    return _Planner(model, observed, now).run()
