"""The feedback loop: feedback store -> Feast -> prompt policy -> the servers' variants file.

``FeedbackLoop.decide`` is shared by ``autoglm run`` and the operator; what they publish differs. In a
cluster the policy goes into each target's ConfigMap (key ``prompt-variants.yaml``, mounted into the
server's pod, which re-reads it when the kubelet swaps it in: ``kube.objects.agent_config``). On one
machine the servers log every request to ``STATE/feedback.db`` and take ratings on
``POST /v1/feedback`` (``--feedback-url``); they read their system prompts and the policy's traffic
shares from ``STATE/prompt-variants.yaml`` (``--prompt-variants``), which this loop rewrites
atomically. Each tick: one micro-batch into the Feast repository in ``STATE/feast`` (local provider),
the stable revision's online features as the bandit's evidence, ``autoglm_feedback.policy.decide``,
and, when it decides, the new shares in the file, the status (``promptPolicy``) and the ledger
(``PromptPolicyChanged`` or ``PromptPolicyRolledBack``, with the arms' posteriors as evidence).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from autoglm_api.resource import AutoGLMModel
from autoglm_api.spec import PromptVariant
from autoglm_api.status import AutoGLMModelStatus, PromptPolicy
from autoglm_operator.plan import DecisionRecord, duration

log = logging.getLogger(__name__)


def enabled(model: AutoGLMModel) -> bool:
    feedback = model.spec.feedback
    return feedback.prompt_optimization.enabled or feedback.retraining.enabled


#: The ConfigMap key (and file name) of the servers' prompt variants.
VARIANTS_KEY = "prompt-variants.yaml"

#: Asks the served model of an AutoGLMModel a chat (an OPRO meta-prompt) and returns its answer.
Ask = Callable[[AutoGLMModel, list[dict[str, str]]], str]


def chat_answer(url: str, served_as: str, messages: list[dict[str, str]], *, timeout: float) -> str:
    """The answer of the model served as ``served_as`` by the server at ``url`` to ``messages``:
    sampled (temperature 0.8, so a second ask can propose something else), without any of the
    policy's system prompts (``prompt_variant: none``), at most 64 tokens."""
    body = {"model": served_as, "messages": messages, "max_tokens": 64, "temperature": 0.8,
            "prompt_variant": "none"}  # fmt: skip
    answer = httpx.post(f"{url.rstrip('/')}/openai/v1/chat/completions", json=body, timeout=timeout)
    answer.raise_for_status()
    return str(answer.json()["choices"][0]["message"]["content"])


def arms_of(model: AutoGLMModel, policy: PromptPolicy | None) -> list[PromptVariant]:
    """The bandit's arms: the spec's variants, then the proposals the served model made."""
    optimization = model.spec.feedback.prompt_optimization
    if not optimization.enabled:
        return []
    spec = list(optimization.variants)
    taken = {v.name for v in spec}
    return spec + [p for p in (policy.proposals if policy else []) if p.name not in taken]


def variants_document(
    model: AutoGLMModel, shares: dict[str, float] | None, proposals: Sequence[PromptVariant] = ()
) -> str:
    """The servers' prompt-variants file (``autoglm_inference.prompts``): every variant's text
    (the spec's, then the ``proposals``) and the shares (the initial policy, an equal split, when
    none was published yet); an empty one (every chat request as the client sent it) without prompt
    optimization."""
    optimization = model.spec.feedback.prompt_optimization
    arms = [*optimization.variants, *proposals] if optimization.enabled else []
    variants = {v.name: v.system for v in arms}
    if variants and not shares:
        shares = {n: round(1.0 / len(variants), 6) for n in variants}
    data: dict[str, Any] = {"active": "none", "variants": variants}
    if variants and shares:
        data["active"] = max(variants, key=lambda n: shares.get(n, 0.0))
        data["weights"] = {n: shares.get(n, 0.0) for n in variants}
    return yaml.safe_dump(data, sort_keys=False)


class FeedbackLoop:
    def __init__(
        self,
        state_dir: Path,
        *,
        say: Callable[[str], None] = print,
        ask: Ask | None = None,
        url: str | None = None,
        feast_dir: Path | None = None,
        online_store: str = "sqlite",
        drift_window: int | None = None,
        datasets: str | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.url = url or f"sqlite:///{state_dir / 'feedback.db'}"
        self.variants_path = state_dir / VARIANTS_KEY
        self.feast_dir = feast_dir or state_dir / "feast"
        self.online_store = online_store
        self.say = say
        #: Asks a model's served model a chat and returns its answer: OPRO proposals (None: none are made).
        self.ask = ask
        self._pipeline: Any = None  # Feast is imported (about a second) only when feedback is on
        self._refreshed: datetime | None = None
        #: How often the request features (latency, errors, energy, drift) are pushed without feedback.
        self.refresh_seconds = 10.0
        #: The drift reference window and the window compared with it, in requests (None: Feast
        #: pipeline's default, 500).
        self.drift_window = drift_window
        #: The feedback count at which a trigger last found too few examples: the dataset is not
        #: queried again (nor the wait said again) until more feedback came.
        self._thin = -1
        #: Where retraining datasets are written, as the pipeline reads them: a ``file://`` folder on
        #: one machine (``STATE/datasets``), a ``pvc://CLAIM/PATH`` folder in a cluster (the operator
        #: writes it through its own mount of the claim; each pipeline step mounts it read-only).
        #: None: no retraining revisions (the operator was given nowhere to put them).
        self.datasets = datasets

    # -- what the servers are started with ---------------------------------------------------------

    def server_args(self, model: AutoGLMModel, status_policy: PromptPolicy | None = None) -> list[str]:
        if not enabled(model):
            return []
        if not self.variants_path.exists():
            self.write_variants(model, status_policy or self.initial(model))
        return ["--feedback-url", self.url, "--prompt-variants", str(self.variants_path)]

    def initial(self, model: AutoGLMModel) -> PromptPolicy:
        from autoglm_feedback.policy import uniform

        optimization = model.spec.feedback.prompt_optimization
        names = [v.name for v in optimization.variants]
        return PromptPolicy(
            algorithm=optimization.algorithm, shares=uniform(names) if len(names) >= 2 else {}
        )

    def write_variants(self, model: AutoGLMModel, policy: PromptPolicy | None) -> None:
        """The servers' variants file (atomic rename: a server never reads half of it)."""
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=".prompt-variants-", suffix=".yaml")
        with os.fdopen(fd, "w") as out:
            out.write(
                variants_document(
                    model, policy.shares if policy else None, policy.proposals if policy else ()
                )
            )
        os.replace(tmp, self.variants_path)

    # -- one tick ----------------------------------------------------------------------------------

    def pipeline(self) -> Any:
        if self._pipeline is None:
            from autoglm_core.feedback.store import FeedbackStore
            from autoglm_feedback.features import REFERENCE_REQUESTS, FeaturePipeline, open_features

            store = FeedbackStore(self.url)
            self._pipeline = FeaturePipeline(
                store, open_features(self.feast_dir, self.online_store), self.feast_dir,
                reference_requests=self.drift_window or REFERENCE_REQUESTS,
            )  # fmt: skip
            if pending := store.count_feedback(pushed=False):
                self.say(f"feedback: replaying {pending} events a stopped loop had not pushed to Feast")
        return self._pipeline

    def tick(
        self, model: AutoGLMModel, status: AutoGLMModelStatus, now: datetime
    ) -> tuple[AutoGLMModelStatus, list[DecisionRecord]]:
        """``decide``, then the new shares into the servers' variants file."""
        if not self.variants_path.exists():
            return status, []
        status, records = self.decide(model, status, now)
        policy = status.prompt_policy
        document = variants_document(
            model, policy.shares if policy else None, policy.proposals if policy else ()
        )
        try:
            current = self.variants_path.read_text()
        except OSError:
            current = None
        if current != document:  # a new policy, or the manifest's variants were edited
            self.write_variants(model, policy)
        return status, records

    def decide(
        self, model: AutoGLMModel, status: AutoGLMModelStatus, now: datetime
    ) -> tuple[AutoGLMModelStatus, list[DecisionRecord]]:
        """Push the waiting feedback's features; decide the prompt policy of the stable revision (the
        status carries it; the records are for the ledger)."""
        if not enabled(model):
            return status, []
        from autoglm_feedback.features import evidence, online_stats
        from autoglm_feedback.policy import decide
        from autoglm_feedback.proposals import with_priors

        name = model.metadata.name or ""
        pipeline = self.pipeline()
        refresh = self._refreshed is None or (now - self._refreshed).total_seconds() >= self.refresh_seconds
        pipeline.run_until_empty(models=[name] if refresh else [])
        if refresh:
            self._refreshed = now
        optimization = model.spec.feedback.prompt_optimization
        stable = status.revisions.stable
        policy = status.prompt_policy or self.initial(model)
        if not optimization.enabled or not stable:
            return status.model_copy(update={"prompt_policy": policy}), []
        arms = arms_of(model, policy)
        names = [v.name for v in arms]
        proposed = [p.name for p in policy.proposals]
        stats = online_stats(pipeline.features, [(name, stable, v) for v in names])
        rated = evidence(stats, stable)
        same_revision = policy.revision in (None, stable)
        analysis = model.spec.rollout.analysis
        decision = decide(
            optimization.model_copy(update={"variants": arms}),
            with_priors(rated, proposed, self._arms(arms, rated)), policy.shares,
            features={v: stats[(name, stable, v)] for v in names}, analysis=analysis,
            last_change=policy.updated_at, now=now, interval=duration(analysis.interval),
            held=frozenset(policy.held if same_revision else ()),
        )  # fmt: skip
        records: list[DecisionRecord] = []
        if decision is not None:
            held = set(policy.held if same_revision else ())
            if decision.kind == "PromptPolicyRolledBack":
                held |= set(decision.evidence.get("failed", {}))
            policy = policy.model_copy(update={
                "algorithm": optimization.algorithm, "revision": stable, "shares": decision.shares,
                "feedback": decision.feedback, "updated_at": now, "held": sorted(held),
            })  # fmt: skip
            shown = ", ".join(f"{n} {s:.0%}" for n, s in decision.shares.items())
            records.append(DecisionRecord(
                kind=decision.kind, revision=stable, reason=f"{shown}: {decision.reason}",
                evidence={"revision": stable, **decision.evidence}, idempotency_key=decision.key(stable),
            ))  # fmt: skip
        if self.ask is not None:
            policy, proposal = self._propose(model, arms, rated, policy, stable)
            records += proposal
        return status.model_copy(update={"prompt_policy": policy}), records

    # -- canary retraining -------------------------------------------------------------------------

    def retrain(
        self,
        model: AutoGLMModel,
        status: AutoGLMModelStatus,
        now: datetime,
        artifact_of: Callable[[str], str | None] | None = None,
    ) -> tuple[AutoGLMModelStatus, list[DecisionRecord]]:
        """Settle a retraining candidate whose rollout ended (``retraining.settle``; a promoted one's
        first requests are its own drift reference); then, when no rollout runs, whether the stable
        revision's Feast features trigger retraining (``autoglm_feedback.retraining.trigger``). A
        trigger exports the rated requests as a dataset (into ``datasets``, content-addressed) and
        sets ``status.retraining.candidate``: the next ``plan()`` builds and canaries its revision.
        ``artifact_of``: the URI of a revision's artifact, which validate measures the fine-tune
        against on the held-out feedback (without it: against the source)."""
        from autoglm_operator.retraining import can_trigger, settle

        settled = settle(model, status)
        status = settled.status
        if settled.outcome == "promoted":
            self.say(f"retraining: {settled.revision} promoted; its first requests are its drift reference")
        elif settled.outcome == "rejected":
            self.say(f"retraining: {settled.revision} was rejected; the stable revision keeps serving")
        spec = model.spec.feedback.retraining
        if not spec.enabled or self.datasets is None or not can_trigger(status):
            return status, []
        return self._trigger(model, status, now, artifact_of)

    def _trigger(
        self,
        model: AutoGLMModel,
        status: AutoGLMModelStatus,
        now: datetime,
        artifact_of: Callable[[str], str | None] | None,
    ) -> tuple[AutoGLMModelStatus, list[DecisionRecord]]:
        from autoglm_core.variants import rollout_revision
        from autoglm_feedback.features import online_stats
        from autoglm_feedback.retraining import MIN_EXAMPLES, dataset, trigger
        from autoglm_operator.retraining import fine_tune, triggered, with_training

        name, stable = model.metadata.name or "", status.revisions.stable or ""
        arms = arms_of(model, status.prompt_policy)
        names = sorted({"none", *(v.name for v in arms)})
        stats = online_stats(self.pipeline().features, [(name, stable, v) for v in names])
        count = sum(int(v.get("feedback_count") or 0) for v in stats.values())
        total = sum(float(v.get("feedback_sum") or 0.0) for v in stats.values())
        drift = next(iter(stats.values()), {})  # one per revision: every variant's row carries it
        previous = status.retraining
        since = previous.feedback if previous is not None and previous.revision == stable else 0
        spec = model.spec.feedback.retraining
        found = trigger(
            spec, revision=stable, feedback_count=count, feedback_sum=total, drift=drift, since=since
        )
        if found is None or self._thin == count:  # nothing, or too few examples at this count already
            return status, []
        settings = spec.fine_tune
        rated = self.pipeline().store.rated_requests(name, limit=settings.max_examples)
        data = dataset(rated, {v.name: v.system for v in arms})
        if len(data.examples) < MIN_EXAMPLES:
            self._thin = count
            self.say(f"retraining: {found.reason}, but only {len(data.examples)} usable examples "
                     f"(at least {MIN_EXAMPLES}): waiting for more feedback")  # fmt: skip
            return status, []
        body = data.jsonl().encode()
        digest = hashlib.sha256(body).hexdigest()
        uri = self._write_dataset(body, f"retrain-{digest[:12]}.jsonl")
        candidate = fine_tune(settings, uri, digest, artifact_of(stable) if artifact_of is not None else None)
        revision = rollout_revision(with_training(model, candidate).spec)
        status = triggered(status, candidate, revision=stable, feedback=count, reason=found.reason,
                           examples=len(data.examples), now=now)  # fmt: skip
        record = DecisionRecord(
            kind="RetrainingTriggered", revision=stable,
            reason=f"{found.reason}: retraining revision {revision} fine-tunes on {len(data.examples)} examples "
                   f"of {len(rated)} rated requests ({data.counts['corrections']} corrections; "
                   f"{data.counts['lowScored']} scored below {data.counts['keepAbove']:.3f} left out)",
            evidence={**found.evidence, "dataset": {"uri": candidate.dataset, "sha256": digest, **data.counts},
                      "training": candidate.to_json(), "retrainingRevision": revision},
            idempotency_key=f"RetrainingTriggered/{stable}/{digest[:16]}",
        )  # fmt: skip
        return status, [record]

    def _write_dataset(self, body: bytes, name: str) -> str:
        """Write ``body`` (atomically, once: the name is its digest) into the datasets folder; its URI."""
        from autoglm_core.uris import local_path

        assert self.datasets is not None
        base = self.datasets.rstrip("/")
        folder = local_path(base)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".retrain-", suffix=".jsonl")
            with os.fdopen(fd, "wb") as out:
                out.write(body)
            os.replace(tmp, path)
        return f"{base}/{name}"

    @staticmethod
    def _arms(arms: Sequence[PromptVariant], rated: dict[str, tuple[float, float]]) -> list[Any]:
        from autoglm_feedback.proposals import Arm

        return [Arm(v.name, v.system, *rated.get(v.name, (0.0, 0.0))) for v in arms]

    def _propose(
        self,
        model: AutoGLMModel,
        arms: Sequence[PromptVariant],
        rated: dict[str, tuple[float, float]],
        policy: PromptPolicy,
        stable: str,
    ) -> tuple[PromptPolicy, list[DecisionRecord]]:
        """An OPRO proposal from the served model when one is due: a new arm (or the worst proposal's
        replacement), with a ``PromptProposed`` record."""
        from autoglm_feedback.policy import MIN_FEEDBACK
        from autoglm_feedback.proposals import propose

        proposed = [p.name for p in policy.proposals]
        ask = self.ask
        assert ask is not None
        try:
            proposal = propose(
                self._arms(arms, rated),
                proposed,
                lambda messages: ask(model, messages),
                min_feedback=MIN_FEEDBACK,
            )
        except Exception as exc:  # the server is busy or down: try again at a later tick
            log.warning("no prompt proposal this time: %s", exc)
            return policy, []
        if proposal is None:
            return policy, []
        kept = [p for p in policy.proposals if p.name != proposal.replaces]
        policy = policy.model_copy(
            update={"proposals": [*kept, PromptVariant(name=proposal.name, system=proposal.text)]}
        )
        replaced = f", replacing {proposal.replaces}" if proposal.replaces else ""
        record = DecisionRecord(
            kind="PromptProposed", revision=stable,
            reason=f"{proposal.name}: {proposal.text!r}, proposed by the served model{replaced}; it joins the arms",
            evidence={"name": proposal.name, "text": proposal.text, "replaces": proposal.replaces,
                      "metaPrompt": proposal.messages[0]["content"],
                      "arms": {n: {"n": v[0], "sum": v[1]} for n, v in rated.items()}},
            idempotency_key=f"PromptProposed/{stable}/{proposal.name}",
        )  # fmt: skip
        return policy, [record]
