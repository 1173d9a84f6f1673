"""The agent's plan: from what a server serves to what its ConfigMap says, in the server's own atomic
calls, and nothing when they agree. Checked against a model of the server (``_serve``) that knows
nothing of the plan."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoglm_operator.agent.desired import Assignment, Desired, DesiredStateError
from autoglm_operator.agent.reconcile import Step, steps
from autoglm_operator.plan import Serving

A = Assignment("rev-a", "s3://b/rev-a", "a" * 64)
B = Assignment("rev-b", "s3://b/rev-b", "b" * 64, weight=10)
C = Assignment("rev-c", "s3://b/rev-c", "c" * 64, weight=50)


def _serve(served: Serving, step: Step) -> Serving:
    """The server's repository routes, as the server test suite checks them."""
    if step.kind == "load-stable":
        assert step.uri, "a load names its artifact"
        return Serving(stable=step.revision)  # an atomic swap; a canary does not survive it
    if step.kind == "load-canary":
        assert served.stable is not None, "a canary needs a stable revision"
        return Serving(stable=served.stable, canary=step.revision, weight=step.weight or 0)
    if step.kind == "weight":
        assert served.canary == step.revision
        return Serving(stable=served.stable, canary=served.canary, weight=step.weight or 0)
    if step.kind == "promote":
        assert served.canary == step.revision
        return Serving(stable=served.canary)
    assert served.canary == step.revision  # rollback
    return Serving(stable=served.stable)


def _wanted(desired: Desired) -> Serving:
    if desired.candidate is None:
        return Serving(stable=desired.stable.revision)
    return Serving(desired.stable.revision, desired.candidate.revision, desired.candidate.weight)


def test_in_sync_asks_for_nothing() -> None:
    assert steps(Desired(A), Serving(stable="rev-a")) == []
    assert steps(Desired(A, B), Serving("rev-a", "rev-b", 10)) == []


def test_a_canary_is_loaded_then_weighted_then_promoted_where_it_is_warm() -> None:
    assert steps(Desired(A, B), Serving(stable="rev-a")) == [
        Step("load-canary", "rev-b", B.uri, B.sha256, 10)
    ]
    assert steps(Desired(A, C.__class__("rev-b", B.uri, B.sha256, 50)), Serving("rev-a", "rev-b", 10)) == [
        Step("weight", "rev-b", weight=50)
    ]
    # The operator promoted: stable is now rev-b and there is no candidate.
    assert steps(Desired(Assignment("rev-b", B.uri, B.sha256)), Serving("rev-a", "rev-b", 50)) == [
        Step("promote", "rev-b")
    ]


def test_a_rolled_back_canary_leaves_and_stable_stays() -> None:
    assert steps(Desired(A), Serving("rev-a", "rev-b", 10)) == [Step("rollback", "rev-b")]


def test_a_new_candidate_replaces_a_superseded_one() -> None:
    assert steps(Desired(A, C), Serving("rev-a", "rev-b", 10)) == [
        Step("rollback", "rev-b"),
        Step("load-canary", "rev-c", C.uri, C.sha256, 50),
    ]


def test_an_empty_server_gets_stable_first_then_the_candidate() -> None:
    assert steps(Desired(A, B), Serving()) == [
        Step("load-stable", "rev-a", A.uri, A.sha256),
        Step("load-canary", "rev-b", B.uri, B.sha256, 10),
    ]


REVISIONS = [Assignment(f"rev-{n}", f"s3://b/rev-{n}", n * 64) for n in "abcd"]
served_states = st.one_of(
    st.just(Serving()),
    st.builds(lambda s: Serving(stable=s), st.sampled_from([r.revision for r in REVISIONS])),
    st.builds(
        lambda pair, w: Serving(pair[0], pair[1], w),
        st.sampled_from(list(itertools.permutations([r.revision for r in REVISIONS], 2))),
        st.integers(0, 100),
    ),
)
desired_states = st.one_of(
    st.builds(Desired, st.sampled_from(REVISIONS)),
    st.builds(
        lambda pair, w: Desired(pair[0], Assignment(pair[1].revision, pair[1].uri, pair[1].sha256, w)),
        st.sampled_from(list(itertools.permutations(REVISIONS, 2))),
        st.integers(0, 100),
    ),
)


@given(desired=desired_states, served=served_states)
def test_from_any_state_the_steps_reach_the_desired_one_and_then_ask_for_nothing(
    desired: Desired, served: Serving
) -> None:
    plan = steps(desired, served)
    assert len(plan) <= 3
    for step in plan:
        served = _serve(served, step)
    assert served == _wanted(desired)
    assert steps(desired, served) == []


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "must be a JSON object"),
        ({"stable": None}, "stable must be an object"),
        ({"stable": {"revision": "", "uri": "x"}}, "stable.revision must be a non-empty string"),
        ({"stable": {"revision": "a", "uri": "x", "sha256": "abc"}}, "stable.sha256 must be 64 hex digits"),
        ({"stable": {"revision": "a", "uri": "x"}, "candidate": {"revision": "b", "uri": "y", "weight": 101}},
         "candidate.weight must be an integer in 0..100"),
        ({"stable": {"revision": "a", "uri": "x"}, "candidate": {"revision": "a", "uri": "y"}},
         "candidate and stable are both revision a"),
    ],
)  # fmt: skip
def test_a_malformed_desired_state_names_the_field_and_what_it_takes(document: object, message: str) -> None:
    with pytest.raises(DesiredStateError, match=message):
        Desired.from_json(document)


def test_the_document_the_operator_writes_reads_back() -> None:
    desired = Desired(A, B, generation=7)
    assert Desired.from_json(desired.to_json()) == desired
