"""The prompt policy: what share of chat traffic each system-prompt variant gets (pure decisions).

``decide`` turns the feature store's evidence for the stable revision (each variant's feedback count
and score sum) into the next published shares:

- the bandit of ``spec.feedback.promptOptimization.algorithm`` says where the traffic should go;
- nothing changes before ``min_feedback`` events, nor for a move smaller than ``min_change``
  (total variation distance: the share of traffic that would switch variant), so the servers'
  file is not rewritten for noise;
- a larger move is taken like a canary: at most ``max_step`` of the traffic moves per analysis
  interval, and the next step is taken only if the variants that gained traffic in the last one
  pass the rollout's analysis gates on their own figures (error rate and p95 latency, once they have
  ``min_requests`` requests, against the limits and the other variants); if they fail, they go back to an equal
  share at most (a rollback) and are *held* there (``held``, kept in the status by the caller) until
  the stable revision changes, so the policy never flaps between a step and its rollback.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from autoglm_api.spec import Analysis, PromptOptimization
from autoglm_feedback.bandits import make_policy, moved_share

#: Feedback events before the first change of the shares.
MIN_FEEDBACK = 20
#: The smallest move worth publishing (share of traffic switching variant).
MIN_CHANGE = 0.05
#: The largest move per analysis interval; a larger one is stepped.
MAX_STEP = 0.25
#: A variant over a limit fails only when it is this much worse than the best other variant: p95s
#: of a few dozen requests each differ by 10-20% between identical variants (measured on SmolLM2).
MARGIN = 1.25


@dataclass(frozen=True)
class PolicyDecision:
    kind: Literal["PromptPolicyChanged", "PromptPolicyRolledBack"]
    shares: dict[str, float]
    previous: dict[str, float]
    #: Where the bandit wants the traffic (``shares`` is a step toward it when the move is large).
    target: dict[str, float]
    moved: float
    feedback: int
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def key(self, revision: str) -> str:
        """An idempotency key: the same decision on the same evidence is recorded once."""
        digest = hashlib.sha256(
            json.dumps([self.kind, revision, self.shares, self.feedback], sort_keys=True).encode()
        )
        return f"{self.kind}/{revision}/{digest.hexdigest()[:16]}"


def uniform(names: list[str]) -> dict[str, float]:
    return {n: round(1.0 / len(names), 6) for n in names}


def decide(
    optimization: PromptOptimization,
    evidence: Mapping[str, tuple[float, float]],
    current: Mapping[str, float] | None,
    *,
    features: Mapping[str, Mapping[str, Any]] | None = None,
    analysis: Analysis | None = None,
    last_change: datetime | None = None,
    now: datetime,
    interval: timedelta = timedelta(minutes=1),
    min_feedback: int = MIN_FEEDBACK,
    min_change: float = MIN_CHANGE,
    max_step: float = MAX_STEP,
    seed: int = 0,
    held: frozenset[str] = frozenset(),
) -> PolicyDecision | None:
    """The next shares, or None to keep the current ones. ``evidence``: ``{variant: (n, score sum)}``;
    ``features``: each variant's online features (error_rate, latency_p95_s, feedback_score,
    requests), for the gate on the last step."""
    names = [v.name for v in optimization.variants]
    if not optimization.enabled or len(names) < 2:
        return None
    before = {n: float((current or {}).get(n, 0.0)) for n in names}
    if sum(before.values()) <= 0:
        before = uniform(names)
    total = int(sum(evidence.get(n, (0, 0.0))[0] for n in names))
    if last_change is not None and now - last_change < interval:
        return None
    policy = make_policy(
        optimization.algorithm, names, **({"seed": seed} if optimization.algorithm == "thompson" else {})
    )
    policy.set_evidence({n: evidence.get(n, (0.0, 0.0)) for n in names})
    arms = policy.evidence()

    failed = _failed_gates(before, names, features or {}, analysis) if last_change is not None else {}
    if failed:
        back = _previous(before, failed)
        return PolicyDecision(
            "PromptPolicyRolledBack", back, before, back, moved_share(before, back), total,
            "variants that gained traffic in the last step failed the analysis gates: "
            + "; ".join(f"{n}: {why}" for n, why in failed.items()),
            {"algorithm": optimization.algorithm, "arms": arms, "failed": failed, "features": dict(features or {})},
        )  # fmt: skip
    if total < min_feedback:
        return None
    target = _capped(policy.shares(), held)
    moved = moved_share(before, target)
    if moved < min_change:
        return None
    shares = target
    if moved > max_step:  # a step toward the target, like a canary's weight
        fraction = max_step / moved
        shares = {n: round(before[n] + (target[n] - before[n]) * fraction, 6) for n in names}
    step = moved_share(before, shares)
    best = max(target, key=lambda n: target[n])
    return PolicyDecision(
        "PromptPolicyChanged", shares, before, target, step, total,
        f"{optimization.algorithm} on {total} feedback events favours {best} "
        f"(mean score {arms[best]['mean']:.3f} over {arms[best]['n']:.0f}); {step:.0%} of traffic moves"
        + (f", a step of at most {max_step:.0%} toward the target" if step < moved - 1e-9 else ""),
        {"algorithm": optimization.algorithm, "arms": arms, "before": before, "after": shares, "target": target,
         "features": dict(features or {})},
    )  # fmt: skip


def _failed_gates(
    shares: Mapping[str, float],
    names: list[str],
    features: Mapping[str, Mapping[str, Any]],
    analysis: Analysis | None,
) -> dict[str, str]:
    """The variants holding more than an equal share whose own figures break an analysis limit
    (error rate, p95 latency) that some other variant meets, or meets ``MARGIN`` times better: all variants run on the
    same revision, which its own canary already judged, so a limit every variant breaks (a slow
    model) is not the prompt's fault. The feedback score is the bandit's objective, not a gate."""
    if analysis is None:
        return {}
    figures = {n: features.get(n) or {} for n in names}
    judged = {n: f for n, f in figures.items() if (f.get("requests") or 0) >= analysis.min_requests}
    failed = {}
    for name, f in judged.items():
        if shares.get(name, 0.0) <= 1.0 / len(names):
            continue
        others = [o for n, o in figures.items() if n != name]  # compared on whatever they served
        problems = []
        for key, limit, scale, label, unit in (
            ("error_rate", analysis.max_error_rate, 1.0, "error rate", ""),
            ("latency_p95_s", analysis.max_p95_latency_ms, 1000.0, "p95 latency", " ms"),
        ):
            value = f.get(key)
            if value is None or value * scale <= limit:
                continue
            best = min((o[key] for o in others if o.get(key) is not None), default=None)
            if best is None or value > best * MARGIN:
                shown = f"{value * scale:.3g}{unit} > {limit:g}{unit}"
                problems.append(
                    f"{label} {shown}"
                    + (f" (another variant: {best * scale:.3g}{unit})" if best is not None else "")
                )
        if problems:
            failed[name] = ", ".join(problems)
    return failed


def _capped(shares: Mapping[str, float], held: frozenset[str]) -> dict[str, float]:
    """``shares`` with the held variants at an equal share at most, the rest spread by their shares."""
    out = dict(shares)
    cap = 1.0 / len(out)
    over = {n: out[n] - cap for n in held if out.get(n, 0.0) > cap}
    free = [n for n in out if n not in held]
    weight = sum(out[n] for n in free)
    for n, extra in over.items():
        out[n] = cap
        for m in free:
            out[m] += extra * (out[m] / weight if weight > 0 else 1.0 / len(free))
    return {n: round(v, 6) for n, v in out.items()}


def _previous(shares: Mapping[str, float], failed: Mapping[str, str]) -> dict[str, float]:
    """The failed variants back to an equal share at most, the rest spread over the others."""
    names = list(shares)
    cap = 1.0 / len(names)
    out = {n: (min(s, cap) if n in failed else s) for n, s in shares.items()}
    spare = 1.0 - sum(out.values())
    others = [n for n in names if n not in failed] or names
    for n in others:
        out[n] += spare / len(others)
    return {n: round(v, 6) for n, v in out.items()}
