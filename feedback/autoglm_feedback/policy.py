"""The prompt policy: what share of chat traffic each system-prompt variant gets (pure decisions).

``decide`` turns the feature store's evidence for the stable revision (each variant's feedback count
and score sum) into the next published shares:

- the bandit of ``spec.feedback.promptOptimization.algorithm`` says where the traffic should go;
- nothing changes before ``min_feedback`` events, nor for a move smaller than ``min_change``
  (total variation distance: the share of traffic that would switch variant), so the servers'
  file is not rewritten for noise;
- a larger move is taken like a canary: at most ``max_step`` of the traffic moves per analysis
  interval, and the next step is taken only if the variants that gained traffic in the last one
  pass the rollout's analysis gates on their own figures (error rate, p95 latency, and the feedback
  score floor once they have ``min_requests`` requests); if they fail, they go back to an equal
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
    """The variants holding more than an equal share whose own figures fail the analysis gates."""
    if analysis is None:
        return {}
    failed = {}
    for name in names:
        f = features.get(name) or {}
        if shares.get(name, 0.0) <= 1.0 / len(names) or (f.get("requests") or 0) < analysis.min_requests:
            continue
        problems = []
        if (rate := f.get("error_rate")) is not None and rate > analysis.max_error_rate:
            problems.append(f"error rate {rate:.3f} > {analysis.max_error_rate}")
        if (p95 := f.get("latency_p95_s")) is not None and p95 * 1000 > analysis.max_p95_latency_ms:
            problems.append(f"p95 latency {p95 * 1000:.0f} ms > {analysis.max_p95_latency_ms:g} ms")
        if (score := f.get("feedback_score")) is not None and score < analysis.min_feedback_score:
            problems.append(f"feedback score {score:.3f} < {analysis.min_feedback_score}")
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
