"""What an agent must ask its server to do so that it serves what its target's ConfigMap says. Pure.

``steps(desired, served)`` returns the repository calls, in order, that take a server from what it
serves (``Serving``: stable, canary and its weight, from ``GET /v2/repository/index``) to the
desired state (``Desired``: stable and, during a canary, the candidate with its weight). Each call
is one of the server's atomic operations (load with verify and warm-up, weight, promote, rollback),
so a server is never left without a ready stable revision, and the same desired state applied twice
asks for nothing the second time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from autoglm_operator.agent.desired import Desired
from autoglm_operator.plan import Serving

StepKind = Literal["load-stable", "load-canary", "weight", "promote", "rollback"]


@dataclass(frozen=True)
class Step:
    kind: StepKind
    revision: str
    uri: str | None = None
    sha256: str | None = None
    weight: int | None = None


def _after(served: Serving, step: Step) -> Serving:
    """What the server serves once ``step`` succeeded."""
    if step.kind == "load-stable":
        return Serving(stable=step.revision)
    if step.kind == "load-canary":
        return dataclasses.replace(served, canary=step.revision, weight=step.weight or 0)
    if step.kind == "weight":
        return dataclasses.replace(served, weight=step.weight or 0)
    if step.kind == "promote":
        return Serving(stable=served.canary)
    return dataclasses.replace(served, canary=None, weight=0)  # rollback


def steps(desired: Desired, served: Serving) -> list[Step]:
    """The calls that take ``served`` to ``desired``, in order; empty when it already is."""
    plan: list[Step] = []

    def take(step: Step) -> None:
        nonlocal served
        plan.append(step)
        served = _after(served, step)

    stable = desired.stable
    if served.stable != stable.revision:
        if served.canary == stable.revision:  # the canary won: it becomes stable where it is warm
            take(Step("promote", stable.revision))
        else:  # an atomic swap: the old stable serves until the new one is verified and warm
            take(Step("load-stable", stable.revision, stable.uri, stable.sha256))
    candidate = desired.candidate
    if served.canary is not None and (candidate is None or served.canary != candidate.revision):
        take(Step("rollback", served.canary))
    if candidate is not None:
        if served.canary != candidate.revision:
            take(Step("load-canary", candidate.revision, candidate.uri, candidate.sha256, candidate.weight))
        elif served.weight != candidate.weight:
            take(Step("weight", candidate.revision, weight=candidate.weight))
    return plan
