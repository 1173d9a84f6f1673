"""OPRO-style proposals: what the model is asked, what of its reply becomes an arm, and when."""

from __future__ import annotations

import pytest

from autoglm_feedback.proposals import (
    MAX_PROPOSALS,
    PRIOR_EVENTS,
    Arm,
    due,
    meta_messages,
    name_of,
    parse,
    propose,
    with_priors,
)

ARMS = [
    Arm("concise", "Answer in one short sentence.", 40, 30.0),
    Arm("detailed", "Explain in detail.", 40, 8.0),
]


def test_the_model_sees_every_rated_prompt_worst_first() -> None:
    (message,) = meta_messages(ARMS)
    text = message["content"]
    worst = text.index("Prompt: Explain in detail.\nRating: 0.20 (40 ratings)")
    assert worst < text.index("Prompt: Answer in one short sentence.\nRating: 0.75 (40 ratings)")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('"Reply in a few words."', "Reply in a few words."),
        ("Prompt: Be brief and   direct.\n\nThis prompt works because...", "Be brief and direct."),
        ("New system prompt: Keep answers under ten words.", "Keep answers under ten words."),
        ("answer in one short sentence.", None),  # the same as a tried one
        ("Hi", None),
        ("", None),
        ("x" * 500, None),
    ],
)
def test_a_reply_becomes_a_prompt_only_when_usable(reply: str, expected: str | None) -> None:
    assert parse(reply, [a.text for a in ARMS]) == expected


def test_proposals_wait_for_evidence_and_never_replace_an_arm_without_it() -> None:
    assert (
        due([*ARMS, Arm("opro-1", "x", 3, 1.0)], ["opro-1"], min_feedback=20) is None
    )  # the last one untested
    assert due(ARMS, [], min_feedback=20) == ""
    full = [*ARMS, *(Arm(f"opro-{i}", f"p{i}", 30, 15.0 + i) for i in range(MAX_PROPOSALS))]
    names = [f"opro-{i}" for i in range(MAX_PROPOSALS)]
    assert due(full, names, min_feedback=20) is None  # the worst arm is a spec variant: it stays
    worse = [*ARMS, Arm("opro-0", "p0", 30, 1.0), *full[3:]]
    assert due(worse, names, min_feedback=20) == "opro-0"


def test_a_proposal_from_the_model_enters_with_an_average_prior() -> None:
    asked: list[list[dict[str, str]]] = []

    def ask(messages: list[dict[str, str]]) -> str:
        asked.append(messages)
        return "Reply in at most ten words."

    proposal = propose(ARMS, [], ask, min_feedback=20)
    assert proposal is not None
    assert proposal.name == name_of("Reply in at most ten words.")
    assert proposal.replaces is None
    assert asked == [proposal.messages]
    evidence = with_priors({"concise": (40, 30.0), "detailed": (40, 8.0)}, [proposal.name], ARMS)
    n, total = evidence[proposal.name]
    assert n == PRIOR_EVENTS
    assert total / n == pytest.approx(38.0 / 80.0)
    assert propose(ARMS, [], lambda _m: "Answer in one short sentence.", min_feedback=20) is None
