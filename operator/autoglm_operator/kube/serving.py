"""The cluster's serving backend, pure part: the core's serving actions as the targets' desired states.

In a cluster the operator never calls a server. It writes what each target should serve into the
target's ConfigMap (``kube.objects.agent_config``), and the agents beside the servers make them serve
it (``agent.reconcile``). ``desired_after(desired, action)`` is that translation for one action of
``plan()``: the same outcome as the embedded loop's ``LocalServing.apply`` calling the server itself,
which ``tests/unit/test_kube_serving.py`` checks on every sequence of actions.
"""

from __future__ import annotations

import dataclasses

from autoglm_operator.agent.desired import Assignment, Desired
from autoglm_operator.plan import Action


class ServingActionError(ValueError):
    """An action that cannot be expressed as a desired state (the message says which and why)."""


def desired_after(desired: Desired | None, action: Action) -> Desired | None:
    """The target's desired state once ``action`` is taken; ``desired`` None: nothing served yet."""
    generation = (desired.generation if desired else 0) + 1
    candidate = desired.candidate if desired else None
    if action.kind == "LoadCanary":
        if desired is None:
            raise ServingActionError(
                f"LoadCanary {action.revision}: the target serves no stable revision to canary against"
            )
        if not action.uri:
            raise ServingActionError(f"LoadCanary {action.revision}: no artifact URI")
        new = Assignment(action.revision, action.uri, weight=action.weight or 0)
        return Desired(desired.stable, new, generation)
    if action.kind == "SetWeight":
        if desired is None or candidate is None or candidate.revision != action.revision:
            return desired  # not the canary (any more): nothing to change, as on a server
        return Desired(desired.stable, dataclasses.replace(candidate, weight=action.weight or 0), generation)
    if action.kind == "Promote":
        if candidate is not None and candidate.revision == action.revision:
            return Desired(dataclasses.replace(candidate, weight=100), None, generation)
        if desired is not None and desired.stable.revision == action.revision:
            return desired
        if not action.uri:
            raise ServingActionError(f"Promote {action.revision}: not loaded and no artifact URI")
        return Desired(Assignment(action.revision, action.uri), None, generation)  # an atomic swap
    if action.kind == "Unload":
        if candidate is not None and candidate.revision == action.revision:
            assert desired is not None
            return Desired(desired.stable, None, generation)  # the canary leaves; stable stays
        return desired  # a former stable revision was retired by the promotion already
    raise ServingActionError(f"{action.kind} is not a serving action")
