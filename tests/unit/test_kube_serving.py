"""In a cluster the core's serving actions become ConfigMap documents that agents carry out; on one
machine ``LocalServing`` calls the server itself. Both must leave a server serving the same thing:
checked on generated sequences of actions, with the real ``LocalServing`` driving a model of the
server's repository routes, and the agent's steps driving the same model."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm_operator.agent.desired import Assignment, Desired
from autoglm_operator.agent.reconcile import Step, steps
from autoglm_operator.backends.local_serving import LocalServing
from autoglm_operator.kube.serving import ServingActionError, desired_after
from autoglm_operator.plan import Action, Serving

REVISIONS = ["r1", "r2", "r3"]


class FakeServer:
    """The repository routes' effect on what is served (the server's own tests check these)."""

    def __init__(self, stable: str) -> None:
        self.served = Serving(stable=stable)

    def post(self, url: str, json: dict[str, Any], **_: Any) -> httpx.Response:
        verb = url.rsplit("/", 1)[1]
        parameters = json.get("parameters", {})
        served = self.served
        revision = str(parameters.get("uri", "")).rsplit("/", 1)[-1]
        if verb == "load" and "canaryWeight" in parameters:
            self.served = Serving(served.stable, revision, int(parameters["canaryWeight"]))
        elif verb == "load":
            self.served = Serving(stable=revision)
        elif verb == "weight":
            self.served = Serving(served.stable, served.canary, int(parameters["canaryWeight"]))
        elif verb == "promote":
            self.served = Serving(stable=served.canary)
        elif verb == "rollback":
            self.served = Serving(stable=served.stable)
        return httpx.Response(200, json={}, request=httpx.Request("POST", url))

    def get(self, url: str, **_: Any) -> httpx.Response:
        s = self.served
        entry = {"name": "m", "stable": {"revision": s.stable},
                 "canary": {"revision": s.canary} if s.canary else None, "canaryWeight": s.weight}  # fmt: skip
        return httpx.Response(200, json=[entry], request=httpx.Request("GET", url))


def _uri(revision: str) -> str:
    return f"s3://artifacts/m/{revision}"


def _agent_step(server: FakeServer, step: Step) -> None:
    if step.kind in ("load-stable", "load-canary"):
        body: dict[str, Any] = {"uri": step.uri}
        if step.kind == "load-canary":
            body["canaryWeight"] = step.weight
        server.post("x/load", {"parameters": body})
    elif step.kind == "weight":
        server.post("x/weight", {"parameters": {"canaryWeight": step.weight}})
    else:
        server.post(f"x/{step.kind}", {})


actions = st.lists(
    st.one_of(
        st.builds(lambda r, w: Action("LoadCanary", r, weight=w, uri=_uri(r)), st.sampled_from(REVISIONS), st.integers(0, 100)),
        st.builds(lambda r, w: Action("SetWeight", r, weight=w), st.sampled_from(REVISIONS), st.integers(0, 100)),
        st.builds(lambda r: Action("Promote", r, uri=_uri(r)), st.sampled_from(REVISIONS)),
        st.builds(lambda r: Action("Unload", r), st.sampled_from(REVISIONS)),
    ),
    max_size=8,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(sequence=actions)
def test_configmap_and_agent_serve_what_the_local_backend_serves(sequence: list[Action]) -> None:
    direct, through_agent = FakeServer("r0"), FakeServer("r0")
    desired: Desired | None = Desired(Assignment("r0", _uri("r0")))
    backend = LocalServing("m", "http://server")
    for action in sequence:
        if (
            action.kind == "LoadCanary"
            and direct.served.canary is not None
            and action.revision != direct.served.canary
        ):
            continue  # the core never loads a second canary over a live one (it unloads first)
        if action.kind == "LoadCanary" and action.revision == direct.served.stable:
            continue  # nor canaries the stable revision against itself
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(httpx, "post", direct.post)
            patch.setattr(httpx, "get", direct.get)
            backend.apply(action)
        desired = desired_after(desired, action)
        assert desired is not None
        for step in steps(desired, through_agent.served):
            _agent_step(through_agent, step)
        assert through_agent.served == direct.served, action


def test_each_written_state_is_a_new_generation() -> None:
    desired = Desired(Assignment("r0", _uri("r0")))
    loaded = desired_after(desired, Action("LoadCanary", "r1", weight=10, uri=_uri("r1")))
    assert loaded is not None
    weighted = desired_after(loaded, Action("SetWeight", "r1", weight=50))
    assert weighted is not None
    assert (loaded.generation, weighted.generation) == (1, 2)
    assert (
        desired_after(weighted, Action("SetWeight", "r9", weight=5)) is weighted
    )  # not the canary: unchanged


def test_what_cannot_be_a_desired_state_is_refused_with_the_reason() -> None:
    with pytest.raises(ServingActionError, match="no stable revision to canary against"):
        desired_after(None, Action("LoadCanary", "r1", weight=10, uri=_uri("r1")))
    with pytest.raises(ServingActionError, match="not loaded and no artifact URI"):
        desired_after(None, Action("Promote", "r1"))
    with pytest.raises(ServingActionError, match="not a serving action"):
        desired_after(None, Action("StartPipeline", "r1"))
    first = desired_after(None, Action("Promote", "r1", uri=_uri("r1")))
    assert first == Desired(Assignment("r1", _uri("r1")), None, 1)
