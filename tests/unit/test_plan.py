"""The reconcile core through every transition of one target's rollout: pure, so driven step by step."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm_api.resource import AutoGLMModel
from autoglm_api.status import AutoGLMModelStatus
from autoglm_api.validation import load_manifest
from autoglm_core.revision import artifact_revision
from autoglm_core.variants import rollout_revision, target_revisions, variants
from autoglm_operator.canary import AnalysisResult
from autoglm_operator.plan import (
    Analysis,
    Intent,
    Observed,
    PipelineRun,
    Plan,
    Published,
    Serving,
    TargetObserved,
    duration,
    plan,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "autoglm-model.yaml"
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
URI = "file:///artifacts/x"


def example(quantization: str = "int8-weight-only") -> AutoGLMModel:
    model = load_manifest(str(EXAMPLE))
    spec = model.spec.model_copy(deep=True)
    spec.compression.quantization.method = quantization  # type: ignore[assignment]
    return model.model_copy(update={"spec": spec})


def applied(model: AutoGLMModel, result: Plan) -> AutoGLMModel:
    """The model with the plan's status written back (what the loop stores between reconciles)."""
    return model.model_copy(update={"status": result.status})


def succeeded(revision: str) -> PipelineRun:
    return PipelineRun(revision, "Succeeded", gates_passed=True, artifact_uri=URI)


def judged(revision: str, step: int, outcome: str, at: datetime) -> Analysis:
    return Analysis(revision, step, at, AnalysisResult(outcome, f"{outcome} at step {step}"))  # type: ignore[arg-type]


def kinds(result: Plan) -> list[str]:
    return [a.kind for a in result.actions]


def serving_stable(stable_model: AutoGLMModel, now: datetime = T0) -> AutoGLMModel:
    """A model whose first revision was promoted: stable serving, nothing rolling out."""
    rev = artifact_revision(stable_model.spec)
    first = plan(stable_model, Observed(), now)
    done = plan(applied(stable_model, first), Observed(pipeline=succeeded(rev)), now)
    assert done.status.revisions.stable == rev
    return applied(stable_model, done)


def test_a_new_model_starts_its_pipeline_once_and_waits_for_it() -> None:
    model = example()
    rev = artifact_revision(model.spec)
    first = plan(model, Observed(), T0)
    assert kinds(first) == ["StartPipeline"]
    assert first.status.phase == "Compressing"
    assert first.status.revisions.candidate == rev
    (decision,) = first.decisions
    assert decision.kind == "PipelineStarted"
    # A restart before the backend reports asks again with the same idempotency key: one record.
    again = plan(applied(model, first), Observed(), T0)
    assert again.decisions[0].idempotency_key == decision.idempotency_key
    running = plan(applied(model, first), Observed(pipeline=PipelineRun(rev, "Running")), T0)
    assert running.actions == ()
    assert running.status.phase == "Compressing"


@pytest.mark.parametrize(
    ("run", "decision"),
    [
        (lambda rev: PipelineRun(rev, "Failed", reason="OOM in compress"), ["PipelineFailed"]),
        (
            lambda rev: PipelineRun(rev, "Succeeded", gates_passed=False),
            [],
        ),  # the pipeline records GateFailed
    ],
)
def test_a_failed_pipeline_or_gate_rejects_the_revision_and_holds(run, decision) -> None:  # type: ignore[no-untyped-def]
    model = example()
    rev = artifact_revision(model.spec)
    started = applied(model, plan(model, Observed(), T0))
    failed = plan(started, Observed(pipeline=run(rev)), T0)
    assert [d.kind for d in failed.decisions] == decision
    assert failed.status.revisions.rejected == rev
    assert failed.status.revisions.candidate is None
    assert failed.status.phase == "Failed"  # nothing serves yet
    held = plan(applied(model, failed), Observed(pipeline=run(rev)), T0 + timedelta(hours=1))
    assert held.actions == ()  # not rebuilt until the spec changes or a retry is asked for
    retry = Intent("retry", "user:ana", T0 + timedelta(hours=2))
    retried = plan(
        applied(model, failed), Observed(pipeline=run(rev), intents=(retry,)), T0 + timedelta(hours=2)
    )
    assert [(a.kind, a.attempt) for a in retried.actions] == [("StartPipeline", 2)]
    assert retried.decisions[0].actor == "user:ana"


def test_the_first_rollout_goes_to_100_percent_on_its_offline_gates() -> None:
    model = example()
    rev = artifact_revision(model.spec)
    started = applied(model, plan(model, Observed(), T0))
    done = plan(started, Observed(pipeline=succeeded(rev)), T0)
    assert [(a.kind, a.uri) for a in done.actions] == [("Promote", URI)]
    assert done.status.revisions.stable == rev
    assert done.status.phase == "Serving"
    (promoted,) = done.decisions
    assert "first rollout: offline gates alone (the pipeline published no baseline" in promoted.reason
    assert promoted.evidence["firstRollout"] == "offline-gates"
    unchanged = plan(applied(model, done), Observed(pipeline=succeeded(rev), serving=Serving(stable=rev)), T0)
    assert unchanged.actions == ()
    assert unchanged.decisions == ()  # re-applying the same spec does nothing


MiB = 2**20
SOURCE = Published("src-0123456789ab", "file:///artifacts/source", 538 * MiB)


def with_baseline(revision: str, source_bytes: int = 538 * MiB) -> PipelineRun:
    """A first rollout's run: the artifact and the uncompressed source, published side by side."""
    baseline = Published(SOURCE.revision, SOURCE.uri, source_bytes)
    return PipelineRun(revision, "Succeeded", gates_passed=True, artifact_uri=URI,
                       artifact_bytes=135 * MiB, baseline=baseline)  # fmt: skip


def test_the_first_rollout_is_canaried_against_the_source_served_as_the_baseline() -> None:
    model = example()
    rev = artifact_revision(model.spec)
    first = plan(model, Observed(), T0)
    assert [(a.kind, a.baseline) for a in first.actions] == [("StartPipeline", True)]
    run = with_baseline(rev)
    served = plan(applied(model, first), Observed(pipeline=run, memory_available=8 * 2**30), T0)
    assert [(a.kind, a.revision, a.uri) for a in served.actions] == [("Promote", SOURCE.revision, SOURCE.uri)]
    (decision,) = served.decisions
    assert decision.kind == "BaselineServed"
    assert decision.evidence["firstRollout"] == "canary-against-baseline"
    assert decision.evidence["memory"]["neededBytes"] < decision.evidence["memory"]["targetMemoryBytes"]
    revisions = served.status.revisions
    assert (revisions.stable, revisions.baseline, revisions.candidate) == (
        SOURCE.revision,
        SOURCE.revision,
        rev,
    )
    assert served.status.phase == "RollingOut"
    again = plan(applied(model, first), Observed(pipeline=run), T0)  # a restart before it was saved
    assert again.decisions[0].idempotency_key == decision.idempotency_key

    model = applied(model, served)
    loaded = plan(model, Observed(pipeline=run, serving=Serving(stable=SOURCE.revision)), T0)
    assert [(a.kind, a.revision, a.weight) for a in loaded.actions] == [("LoadCanary", rev, 10)]
    (started,) = loaded.decisions
    assert started.evidence == {"against": "baseline", "stable": SOURCE.revision}
    model = applied(model, loaded)
    t, serving = T0, Serving(stable=SOURCE.revision, canary=rev, weight=10)
    for step, pause in enumerate((31, 61, 11)):
        t += timedelta(seconds=pause)
        result = plan(model, Observed(run, serving, judged(rev, step, "Successful", t)), t)
        model = applied(model, result)
        serving = Serving(stable=SOURCE.revision, canary=rev, weight=result.status.canary.weight)
    assert [(a.kind, a.revision) for a in result.actions] == [("Promote", rev), ("Unload", SOURCE.revision)]
    promoted = result.decisions[-1]
    assert (promoted.kind, promoted.evidence["against"], promoted.evidence["previous"]) == (
        "Promoted", "baseline", SOURCE.revision,
    )  # fmt: skip
    assert (model.status.revisions.stable, model.status.revisions.baseline) == (rev, None)  # type: ignore[union-attr]


def test_a_candidate_worse_than_the_source_is_rolled_back_and_the_source_keeps_serving() -> None:
    model = example()
    rev = artifact_revision(model.spec)
    run = with_baseline(rev)
    model = applied(model, plan(model, Observed(), T0))
    model = applied(model, plan(model, Observed(pipeline=run), T0))
    model = applied(model, plan(model, Observed(pipeline=run, serving=Serving(stable=SOURCE.revision)), T0))
    serving = Serving(stable=SOURCE.revision, canary=rev, weight=10)
    for seconds in (10, 20):
        t = T0 + timedelta(seconds=seconds)
        result = plan(model, Observed(run, serving, judged(rev, 0, "Failed", t)), t)
        model = applied(model, result)
    assert [d.kind for d in result.decisions] == ["CanaryIntervalFailed", "RolledBack"]
    assert "the uncompressed source src-0123456789ab keeps serving" in result.decisions[-1].reason
    status = result.status
    assert (status.revisions.stable, status.revisions.rejected, status.phase) == (
        SOURCE.revision, rev, "Serving",
    )  # fmt: skip
    # a retry redoes publish: it publishes the serving source again, or the source would be lost
    retry = Intent("retry", "user:ana", T0 + timedelta(minutes=1))
    retried = plan(model, Observed(run, serving, intents=(retry,)), T0 + timedelta(minutes=1))
    assert [(a.kind, a.attempt, a.baseline) for a in retried.actions] == [("StartPipeline", 2, True)]
    # the next edit is canaried against the source too
    edited = example("int4-weight-only").model_copy(update={"status": status})
    building = plan(edited, Observed(serving=Serving(stable=SOURCE.revision)), T0)
    assert [(a.kind, a.baseline) for a in building.actions] == [("StartPipeline", True)]


@pytest.mark.parametrize(
    ("source_bytes", "available", "why"),
    [
        (4 * 2**30, None, "4Gi"),  # the example's target has 4Gi: not for 4 GiB of fp32 and int8 besides
        (538 * MiB, 600 * MiB, "0.59 GiB available"),  # the machine has too little free
    ],
)
def test_a_target_that_cannot_hold_both_goes_live_on_offline_gates_and_says_why(
    source_bytes: int, available: int | None, why: str
) -> None:
    model = example()
    rev = artifact_revision(model.spec)
    model = applied(model, plan(model, Observed(), T0))
    done = plan(model, Observed(pipeline=with_baseline(rev, source_bytes), memory_available=available), T0)
    assert [(a.kind, a.revision) for a in done.actions] == [("Promote", rev)]
    (promoted,) = done.decisions
    assert (
        "first rollout: offline gates alone: the target cannot hold the source and the candidate"
        in promoted.reason
    )
    assert why in promoted.reason
    assert promoted.evidence["firstRollout"] == "offline-gates"
    assert done.status.revisions.baseline is None


def canary_started(stable_rev_model: AutoGLMModel) -> tuple[AutoGLMModel, str, str]:
    """Stable serving; the spec changed to int4: the new candidate's canary at step 0."""
    stable = serving_stable(stable_rev_model)
    old = stable.status.revisions.stable if stable.status else None
    assert old is not None
    new_model = example("int4-weight-only").model_copy(update={"status": stable.status})
    new = artifact_revision(new_model.spec)
    building = plan(new_model, Observed(serving=Serving(stable=old)), T0)
    assert kinds(building) == ["StartPipeline"]
    loaded = plan(
        applied(new_model, building), Observed(pipeline=succeeded(new), serving=Serving(stable=old)), T0
    )
    assert [(a.kind, a.weight) for a in loaded.actions] == [("LoadCanary", 10)]
    assert [d.kind for d in loaded.decisions] == ["CanaryStarted"]
    return applied(new_model, loaded), old, new


def test_a_good_canary_advances_after_each_pause_then_is_promoted() -> None:
    model, old, new = canary_started(example())
    serving = Serving(stable=old, canary=new, weight=10)
    run = succeeded(new)
    early = plan(
        model,
        Observed(run, serving, judged(new, 0, "Successful", T0 + timedelta(seconds=10))),
        T0 + timedelta(seconds=10),
    )
    assert early.actions == ()  # step 0 pauses 30s
    t1 = T0 + timedelta(seconds=31)
    step1 = plan(model, Observed(run, serving, judged(new, 0, "Successful", t1)), t1)
    assert [(a.kind, a.weight) for a in step1.actions] == [("SetWeight", 50)]
    model = applied(model, step1)
    serving = Serving(stable=old, canary=new, weight=50)
    t2 = t1 + timedelta(minutes=1, seconds=1)
    step2 = plan(model, Observed(run, serving, judged(new, 1, "Successful", t2)), t2)
    assert [(a.kind, a.weight) for a in step2.actions] == [("SetWeight", 100)]
    model = applied(model, step2)
    t3 = t2 + timedelta(seconds=11)  # the last step holds one analysis interval (10s)
    done = plan(
        model,
        Observed(run, Serving(stable=old, canary=new, weight=100), judged(new, 2, "Successful", t3)),
        t3,
    )
    assert [(a.kind, a.revision) for a in done.actions] == [("Promote", new), ("Unload", old)]
    assert done.status.revisions.stable == new
    assert done.status.canary.step is None


def test_inconclusive_analyses_hold_the_weight_forever() -> None:
    model, old, new = canary_started(example())
    serving = Serving(stable=old, canary=new, weight=10)
    for minutes in (1, 10, 100):
        t = T0 + timedelta(minutes=minutes)
        held = plan(model, Observed(succeeded(new), serving, judged(new, 0, "Inconclusive", t)), t)
        assert held.actions == ()
        assert held.status.canary.weight == 10
        assert held.status.revisions.candidate == new


def test_failure_limit_failed_intervals_roll_back_and_leave_stable_untouched() -> None:
    model, old, new = canary_started(example())
    serving = Serving(stable=old, canary=new, weight=10)
    t1 = T0 + timedelta(seconds=10)
    first = plan(model, Observed(succeeded(new), serving, judged(new, 0, "Failed", t1)), t1)
    assert first.actions == ()
    assert first.status.canary.failures == 1
    model = applied(model, first)
    t2 = t1 + timedelta(seconds=10)
    second = plan(model, Observed(succeeded(new), serving, judged(new, 0, "Failed", t2)), t2)
    assert [(a.kind, a.revision, a.weight) for a in second.actions] == [
        ("SetWeight", new, 0),
        ("Unload", new, None),
    ]
    assert [d.kind for d in second.decisions] == ["CanaryIntervalFailed", "RolledBack"]
    assert second.status.revisions.stable == old
    assert second.status.revisions.rejected == new
    assert second.status.phase == "Serving"
    # The same observation again (a restart): the same interval is recorded under the same key.
    keys = {d.idempotency_key for d in first.decisions} | {d.idempotency_key for d in second.decisions}
    assert len(keys) == 3


def test_a_spec_change_during_a_canary_supersedes_the_candidate() -> None:
    model, old, candidate = canary_started(example())
    newer = example("int8-dynamic").model_copy(update={"status": model.status})
    newest = artifact_revision(newer.spec)
    result = plan(newer, Observed(succeeded(candidate), Serving(stable=old, canary=candidate, weight=10)), T0)
    assert [(a.kind, a.revision) for a in result.actions] == [
        ("SetWeight", candidate),
        ("Unload", candidate),
        ("StartPipeline", newest),
    ]
    assert [d.kind for d in result.decisions] == ["Superseded", "PipelineStarted"]
    assert result.status.revisions.candidate == newest
    assert result.status.revisions.stable == old


def test_manual_promote_and_abort_are_recorded_with_who_asked() -> None:
    model, old, new = canary_started(example())
    serving = Serving(stable=old, canary=new, weight=10)
    promote = Intent("promote", "user:ana", T0)
    promoted = plan(model, Observed(succeeded(new), serving, intents=(promote,)), T0)
    assert [a.kind for a in promoted.actions] == ["Promote", "Unload"]
    assert [(d.kind, d.actor) for d in promoted.decisions] == [
        ("ManualOverride", "user:ana"),
        ("Promoted", "user:ana"),
    ]
    abort = Intent("abort", "user:bo", T0)
    aborted = plan(model, Observed(succeeded(new), serving, intents=(abort,)), T0)
    assert [(a.kind, a.weight) for a in aborted.actions] == [("SetWeight", 0), ("Unload", None)]
    assert aborted.status.revisions.rejected == new
    assert aborted.status.revisions.stable == old


def test_a_restart_mid_canary_reloads_the_candidate_at_its_step_without_a_new_decision() -> None:
    model, old, new = canary_started(example())
    t1 = T0 + timedelta(seconds=31)
    step1 = applied(
        model,
        plan(model, Observed(succeeded(new), Serving(old, new, 10), judged(new, 0, "Successful", t1)), t1),
    )
    # The servers were restarted: only stable is back.
    after = plan(step1, Observed(succeeded(new), Serving(stable=old)), t1 + timedelta(seconds=5))
    assert [(a.kind, a.weight) for a in after.actions] == [("LoadCanary", 50)]
    assert after.decisions == ()
    assert after.status.canary.step == 1


def test_durations() -> None:
    assert duration("1h30m") == timedelta(minutes=90)
    assert duration("250ms") == timedelta(milliseconds=250)
    with pytest.raises(ValueError, match="use numbers with ms, s, m or h"):
        duration("5 minutes")


OUTCOMES = st.sampled_from(["Successful", "Failed", "Inconclusive", None])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(OUTCOMES, st.integers(1, 120), st.booleans()), min_size=1, max_size=25))
def test_never_promoted_without_a_successful_last_step_and_stable_always_serves(steps: list) -> None:  # type: ignore[type-arg]
    model, _old, new = canary_started(example())
    now = T0
    for outcome, seconds, loaded in steps:
        now += timedelta(seconds=seconds)
        status = model.status
        assert status is not None
        step = status.canary.step if status.canary.step is not None else 0
        serving = Serving(
            stable=status.revisions.stable, canary=new if loaded else None, weight=status.canary.weight
        )
        analysis = judged(new, step, outcome, now) if outcome else None
        result = plan(model, Observed(succeeded(new), serving, analysis), now)
        if any(a.kind == "Promote" for a in result.actions):
            assert analysis is not None
            assert analysis.result.outcome == "Successful"
            assert step == 2  # the last canary step
            assert loaded
        assert result.status.revisions.stable is not None  # once something was stable, it still serves
        model = applied(model, result)


class _World:
    """Backends that carry out the core's actions at once: a pipeline that succeeds on the next
    observation (every variant), a server per target with stable and canary, an analysis that
    passes at the current step on every target that serves a canary."""

    def __init__(self, baseline: bool, targets: tuple[str, ...]) -> None:
        self.started: list[tuple[str, int]] = []
        self.pipeline: PipelineRun | None = None
        self.serving = {t: Serving() for t in targets}
        #: Whether a run asked for the baseline publishes it (else: an older pipeline without it).
        self.baseline = baseline

    def observe(self, model: AutoGLMModel, now: datetime) -> Observed:
        status = model.status or AutoGLMModelStatus()
        step = status.canary.step
        seen = {}
        for target, serving in self.serving.items():
            analysis = None
            if serving.canary and step is not None:
                analysis = judged(serving.canary, step, "Successful", now)
            seen[target] = TargetObserved(serving, analysis)
        return Observed(pipeline=self.pipeline, targets=seen)

    def act(self, model: AutoGLMModel, result: Plan) -> None:
        for a in result.actions:
            if a.kind == "StartPipeline":
                self.started.append((a.revision, a.attempt or 1))
                run = built(model)
                asked = a.baseline and self.baseline
                self.pipeline = dataclasses.replace(run, baseline=SOURCE) if asked else run
                continue
            s = self.serving[a.target]
            if a.kind == "LoadCanary":
                s = Serving(s.stable, a.revision, a.weight or 0)
            elif a.kind == "SetWeight" and s.canary == a.revision:
                s = Serving(s.stable, s.canary, a.weight or 0)
            elif a.kind == "Promote":
                s = Serving(a.revision, None, 0)
            elif a.kind == "Unload" and s.canary == a.revision:
                s = Serving(s.stable, None, 0)
            self.serving[a.target] = s


def _drive(
    crash_at: int | None, mode: str, baseline: bool, targets: int = 1
) -> tuple[_World, dict[str, str], AutoGLMModel]:
    """First rollout (canaried against the source when ``baseline``, else on its gates), then an
    edit canaried to promotion, on one target or two (each with its precision); at tick
    ``crash_at`` the process dies after acting (``acted``) or after recording too (``recorded``),
    before the status is saved."""
    model, edit = (
        (example(), example("int4-weight-only")) if targets == 1 else (two_targets(), two_targets(samples=64))
    )
    world, ledger = _World(baseline, tuple(t.name for t in model.spec.targets)), {}
    first, edited = rollout_revision(model.spec), False
    for tick in range(40):
        now = T0 + timedelta(minutes=10 * tick)
        revisions = model.status.revisions if model.status else None
        if not edited and revisions and revisions.stable == first and revisions.candidate is None:
            model = model.model_copy(update={"spec": edit.spec})  # the edit
            edited = True
        result = plan(model, world.observe(model, now), now)
        world.act(model, result)
        if crash_at == tick and mode == "acted":
            continue  # died before recording and saving: the next tick plans from the old status
        for d in result.decisions:
            ledger.setdefault(d.idempotency_key, d.kind)
        if crash_at == tick:
            continue  # recorded, died before saving
        model = applied(model, result)
        if edited and model.status.revisions.candidate is None and model.status.revisions.stable:  # type: ignore[union-attr]
            break
    return world, ledger, model


@pytest.mark.parametrize("targets", [1, 2], ids=["one-target", "two-targets"])
@pytest.mark.parametrize("baseline", [True, False], ids=["against-the-source", "on-offline-gates"])
@pytest.mark.parametrize("mode", ["acted", "recorded"])
@pytest.mark.parametrize("crash_at", range(12))
def test_a_restart_in_every_phase_builds_once_and_records_each_decision_once(
    crash_at: int, mode: str, baseline: bool, targets: int
) -> None:
    calm_world, calm_ledger, calm = _drive(None, mode, baseline, targets)
    if baseline:  # the first rollout went through the source
        assert sorted(calm_ledger.values()).count("BaselineServed") == 1
        assert sorted(calm_ledger.values()).count("Promoted") == 2
    world, ledger, model = _drive(crash_at, mode, baseline, targets)
    assert model.status is not None
    assert calm.status is not None
    assert model.status.revisions.stable == calm.status.revisions.stable == rollout_revision(calm.spec)
    assert {t.name: t.revision for t in model.status.targets} == target_revisions(calm.spec)
    assert world.serving == calm_world.serving  # the same revision serves, nothing else loaded
    assert sorted(set(world.started)) == sorted(calm_world.started)  # each revision built once
    assert all(attempt == 1 for _, attempt in world.started)
    assert sorted(ledger.values()) == sorted(calm_ledger.values())  # no decision lost or repeated


# -- one rollout across several targets, each with its precision ------------------------------------


def two_targets(edge: str = "int4", samples: int = 32) -> AutoGLMModel:
    """The example with a second target, on the edge, asking for its own precision."""
    model = example()
    spec = model.spec.model_copy(deep=True)
    local = spec.targets[0]
    spec.targets = [local, local.model_copy(update={"name": "edge", "pool": "kubeedge", "precision": edge})]
    spec.calibration.samples = samples
    return model.model_copy(update={"spec": spec})


def built(model: AutoGLMModel) -> PipelineRun:
    """The run of ``model``'s rollout: every variant published, each with its own artifact."""
    rollout = rollout_revision(model.spec)
    published = tuple(
        Published(v.revision, f"file:///artifacts/{v.revision}", 10 * MiB) for v in variants(model.spec)
    )
    return PipelineRun(
        rollout, "Succeeded", gates_passed=True, artifact_uri=published[0].uri, variants=published
    )


def on_targets(
    model: AutoGLMModel, canary: dict[str, str] | None = None, weight: int = 0, **analyses: Analysis
) -> Observed:
    """What both targets serve, from the saved status (stable per target) and the canary given."""
    assert model.status is not None
    stable = {t.name: t.revision for t in model.status.targets}
    return Observed(
        pipeline=built(model),
        targets={
            t: TargetObserved(
                Serving(stable.get(t), (canary or {}).get(t), weight if canary else 0), analyses.get(t)
            )
            for t in ("local", "edge")
        },
    )


def first_two_target_rollout() -> tuple[AutoGLMModel, dict[str, str]]:
    model = two_targets()
    revisions = target_revisions(model.spec)
    assert revisions["local"] != revisions["edge"]
    started = plan(model, Observed(), T0)
    assert [(a.kind, a.revision) for a in started.actions] == [
        ("StartPipeline", rollout_revision(model.spec))
    ]
    model = applied(model, started)
    done = plan(model, Observed(pipeline=built(model)), T0)  # no baseline published: offline gates
    assert sorted((a.kind, a.target, a.revision, a.uri) for a in done.actions) == sorted(
        ("Promote", t, r, f"file:///artifacts/{r}") for t, r in revisions.items()
    )
    assert {t.name: t.revision for t in done.status.targets} == revisions
    (promoted,) = done.decisions
    assert promoted.evidence["targets"] == revisions
    return applied(model, done), revisions


def test_one_rollout_puts_each_target_precisions_variant_on_it() -> None:
    first_two_target_rollout()


def test_an_edit_is_canaried_on_every_target_and_promoted_together() -> None:
    model, old = first_two_target_rollout()
    model = two_targets(samples=64).model_copy(update={"status": model.status})
    new = target_revisions(model.spec)
    assert all(new[t] != old[t] for t in new)
    model = applied(model, plan(model, Observed(), T0))  # the pipeline
    loaded = plan(model, on_targets(model), T0)
    assert sorted((a.kind, a.target, a.revision, a.weight) for a in loaded.actions) == sorted(
        ("LoadCanary", t, new[t], 10) for t in new
    )
    assert loaded.decisions[0].evidence["targets"] == new
    assert {t.name: t.candidate for t in loaded.status.targets} == new
    model = applied(model, loaded)
    t1 = T0 + timedelta(seconds=31)
    only_local = plan(model, on_targets(model, new, 10, local=judged(new["local"], 0, "Successful", t1)), t1)
    assert only_local.actions == ()  # the edge has not been judged at this step: hold
    both = on_targets(model, new, 10, local=judged(new["local"], 0, "Successful", t1),
                      edge=judged(new["edge"], 0, "Successful", t1))  # fmt: skip
    step1 = plan(model, both, t1)
    assert sorted((a.kind, a.target, a.weight) for a in step1.actions) == [
        ("SetWeight", "edge", 50),
        ("SetWeight", "local", 50),
    ]
    model = applied(model, step1)
    t, weight = t1, 50
    for step, pause in ((1, 61), (2, 11)):
        t += timedelta(seconds=pause)
        judged_both = {n: judged(new[n], step, "Successful", t) for n in new}
        result = plan(model, on_targets(model, new, weight, **judged_both), t)
        model, weight = applied(model, result), result.status.canary.weight
    assert sorted((a.kind, a.target, a.revision) for a in result.actions) == sorted(
        [("Promote", t, new[t]) for t in new] + [("Unload", t, old[t]) for t in old]
    )
    (promoted,) = result.decisions
    assert promoted.kind == "Promoted"
    assert set(promoted.evidence["analyses"]) == {"local", "edge"}
    assert {t.name: (t.revision, t.candidate) for t in result.status.targets} == {
        t: (new[t], None) for t in new
    }


def test_a_failure_on_one_target_rolls_back_every_target() -> None:
    model, old = first_two_target_rollout()
    model = two_targets(samples=64).model_copy(update={"status": model.status})
    new = target_revisions(model.spec)
    model = applied(model, plan(model, Observed(), T0))
    model = applied(model, plan(model, on_targets(model), T0))
    for seconds in (10, 20):
        t = T0 + timedelta(seconds=seconds)
        observed = on_targets(model, new, 10, local=judged(new["local"], 0, "Successful", t),
                              edge=judged(new["edge"], 0, "Failed", t))  # fmt: skip
        result = plan(model, observed, t)
        model = applied(model, result)
    assert [d.kind for d in result.decisions] == ["CanaryIntervalFailed", "RolledBack"]
    assert result.decisions[-1].reason.startswith(
        "2 failed analysis intervals: target edge: Failed at step 0"
    )
    assert sorted((a.kind, a.target, a.revision, a.weight) for a in result.actions) == sorted(
        [("SetWeight", t, new[t], 0) for t in new] + [("Unload", t, new[t], None) for t in new]
    )
    assert {t.name: (t.revision, t.candidate) for t in result.status.targets} == {
        t: (old[t], None) for t in old
    }
    assert result.status.revisions.rejected == rollout_revision(model.spec)


def test_a_precision_change_on_one_target_canaries_only_that_target() -> None:
    model, old = first_two_target_rollout()
    model = two_targets(edge="bf16").model_copy(update={"status": model.status})
    new = target_revisions(model.spec)
    assert new["local"] == old["local"]
    assert new["edge"] != old["edge"]
    assert rollout_revision(model.spec) != model.status.revisions.stable  # type: ignore[union-attr]
    model = applied(model, plan(model, Observed(), T0))
    loaded = plan(model, on_targets(model), T0)
    assert [(a.kind, a.target, a.revision) for a in loaded.actions] == [("LoadCanary", "edge", new["edge"])]
    model = applied(model, loaded)
    t = T0 + timedelta(seconds=31)
    step1 = plan(
        model, on_targets(model, {"edge": new["edge"]}, 10, edge=judged(new["edge"], 0, "Successful", t)), t
    )
    assert [(a.kind, a.target) for a in step1.actions] == [("SetWeight", "edge")]  # local takes no part


def test_the_first_rollout_on_two_targets_serves_the_source_on_both_when_the_machine_holds_all() -> None:
    model = applied(two_targets(), plan(two_targets(), Observed(), T0))
    run = dataclasses.replace(built(model), baseline=SOURCE)
    fits = plan(model, Observed(pipeline=run, memory_available=8 * 2**30), T0)
    assert sorted((a.kind, a.target, a.revision) for a in fits.actions) == [
        ("Promote", "edge", SOURCE.revision), ("Promote", "local", SOURCE.revision),
    ]  # fmt: skip
    assert set(fits.decisions[0].evidence["memory"]) == {"local", "edge"}
    # both servers on one machine with 1.5 GiB free: each would fit alone, not the two together
    short = plan(model, Observed(pipeline=run, memory_available=1536 * MiB), T0)
    assert {a.kind for a in short.actions} == {"Promote"}
    assert {a.revision for a in short.actions} == set(target_revisions(model.spec).values())
    assert (
        "the 2 targets on this machine cannot hold the source and their candidates together"
        in short.decisions[0].reason
    )


def test_a_run_that_did_not_report_sizes_goes_on_offline_gates_and_says_so() -> None:
    model = example()
    rev = artifact_revision(model.spec)
    model = applied(model, plan(model, Observed(), T0))
    unsized = PipelineRun(
        rev, "Succeeded", gates_passed=True, artifact_uri=URI, baseline=Published(SOURCE.revision, SOURCE.uri)
    )
    done = plan(model, Observed(pipeline=unsized), T0)
    assert [(a.kind, a.revision) for a in done.actions] == [("Promote", rev)]
    assert "did not report the weight bytes of the source and the candidate" in done.decisions[0].reason


def test_when_both_targets_fail_an_interval_the_reason_names_both() -> None:
    """The reason is what `autoglm rollout history` shows: naming only the first target that failed
    once hid the other (a CI run's edge had failed, the reason said only local)."""
    model, _old = first_two_target_rollout()
    model = two_targets(samples=64).model_copy(update={"status": model.status})
    new = target_revisions(model.spec)
    model = applied(model, plan(model, Observed(), T0))
    model = applied(model, plan(model, on_targets(model), T0))
    t = T0 + timedelta(seconds=10)
    observed = on_targets(model, new, 10, local=judged(new["local"], 0, "Failed", t),
                          edge=judged(new["edge"], 0, "Failed", t))  # fmt: skip
    result = plan(model, observed, t)
    (failed,) = result.decisions
    assert failed.kind == "CanaryIntervalFailed"
    assert "target local: Failed at step 0" in failed.reason
    assert "target edge: Failed at step 0" in failed.reason
