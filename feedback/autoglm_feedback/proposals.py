"""New system prompts proposed OPRO-style (Yang et al., "Large Language Models as Optimizers", 2023).

The served model is shown the prompts tried so far with the mean rating each earned, worst first,
and asked for a better one. A proposal joins the bandit as a new arm; it never replaces an arm that
has no evidence against it: the spec's variants stay, at most ``MAX_PROPOSALS`` proposals are kept,
and a new one replaces only the worst proposal, once that one has ``min_feedback`` ratings and is the
worst arm of all. Pure code: the caller asks the model (``ask``) and records the decision.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

MAX_PROPOSALS = 3
#: Characters a proposed system prompt may have.
MIN_CHARS, MAX_CHARS = 8, 400
#: A proposal's prior: this many pseudo-ratings at the mean of the arms with evidence, so a new arm
#: starts as an average one (neither ignored nor favoured) until its own ratings speak.
PRIOR_EVENTS = 2.0

META_PROMPT = (
    "You write system prompts for a chat assistant. Below are the system prompts tried so far, each "
    "with the average rating users gave its answers (from 0 to 1, higher is better), worst first.\n\n"
    "{pairs}\n\n"
    "Write one new system prompt, different from all of the above, that users would rate higher. "
    "Reply with the system prompt only, in one or two sentences."
)


@dataclass(frozen=True)
class Arm:
    name: str
    text: str
    n: float
    total: float

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None


@dataclass(frozen=True)
class Proposal:
    name: str
    text: str
    #: The proposal it replaces (None: added beside the others).
    replaces: str | None
    messages: list[dict[str, str]]


def meta_messages(arms: Sequence[Arm]) -> list[dict[str, str]]:
    """The chat the served model is asked: every rated arm, worst first."""
    rated = sorted((a for a in arms if a.mean is not None), key=lambda a: (a.mean or 0.0, a.name))
    pairs = "\n".join(f"Prompt: {a.text}\nRating: {a.mean:.2f} ({a.n:.0f} ratings)" for a in rated)
    return [{"role": "user", "content": META_PROMPT.format(pairs=pairs)}]


def parse(reply: str, existing: Sequence[str]) -> str | None:
    """The system prompt in a model's reply: its first paragraph without quotes or a ``Prompt:``
    label; None when empty, too short or long, or the same as one tried (case and spaces aside)."""
    text = reply.strip().split("\n\n")[0].strip()
    text = re.sub(r"^(new\s+)?(system\s+)?prompt\s*:\s*", "", text, flags=re.IGNORECASE).strip()
    text = text.strip("\"'`“”").strip()
    text = " ".join(text.split())
    if not MIN_CHARS <= len(text) <= MAX_CHARS or not text.isprintable():
        return None
    seen = {" ".join(e.lower().split()) for e in existing}
    return None if text.lower() in seen else text


def name_of(text: str) -> str:
    return "opro-" + hashlib.sha256(text.encode()).hexdigest()[:8]


def due(arms: Sequence[Arm], proposals: Sequence[str], *, min_feedback: int) -> str | None:
    """Whether to propose now: None (not yet), "" (add one beside the others) or the name of the
    proposal to replace. Due once every arm has ``min_feedback`` ratings (so a new proposal waits for
    evidence on the last one); then either there is room, or the worst arm is a proposal."""
    if any(a.n < min_feedback for a in arms):
        return None
    if len(proposals) < MAX_PROPOSALS:
        return ""
    worst = min(arms, key=lambda a: (a.mean if a.mean is not None else 1.0, a.name))
    return worst.name if worst.name in proposals else None


def propose(
    arms: Sequence[Arm],
    proposals: Sequence[str],
    ask: Callable[[list[dict[str, str]]], str],
    *,
    min_feedback: int,
) -> Proposal | None:
    """Ask for a new prompt when one is due; None when not due or the reply is unusable."""
    slot = due(arms, proposals, min_feedback=min_feedback)
    if slot is None:
        return None
    messages = meta_messages(arms)
    text = parse(ask(messages), [a.text for a in arms])
    if text is None:
        return None
    return Proposal(name_of(text), text, slot or None, messages)


def prior(arms: Sequence[Arm]) -> tuple[float, float]:
    """A new arm's pseudo-evidence (n, sum): ``PRIOR_EVENTS`` ratings at the rated arms' mean."""
    rated = [a for a in arms if a.n]
    mean = sum(a.total for a in rated) / sum(a.n for a in rated) if rated else 0.5
    return PRIOR_EVENTS, PRIOR_EVENTS * mean


def with_priors(
    evidence: Mapping[str, tuple[float, float]], proposals: Sequence[str], arms: Sequence[Arm]
) -> dict[str, tuple[float, float]]:
    """``evidence`` with each proposal's prior added to its own ratings."""
    n0, s0 = prior([a for a in arms if a.name not in proposals])
    out = dict(evidence)
    for name in proposals:
        n, total = out.get(name, (0.0, 0.0))
        out[name] = (n + n0, total + s0)
    return out
