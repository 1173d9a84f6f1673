"""Canary retraining's decisions (pure): when feedback or drift triggers a retraining revision, and
the dataset it fine-tunes on.

**When.** ``spec.feedback.retraining``: the stable revision's mean feedback score below
``feedbackScoreBelow``, or its drift statistic (the largest PSI of prompt length, vocabulary and
score against the reference window, ``drift.compare``) above ``driftAbove``; either only once the
revision has ``minFeedback`` feedback events more than it had at its last trigger (a retraining
revision is trained on them, and a rejected one is not retried on the same evidence).

**On what.** The rated requests, each as the conversation the model saw (the client's messages,
with the prompt variant's system prompt the server applied) and a target answer: a reviewer's
correction where there is one, else the served answer when it scored in the better half of the
ratings (at or above their median, and above 0), as filtered behaviour cloning does (ReST, RAFT);
low-scored answers are excluded. The examples are JSON Lines in the format the pipeline's
``finetune`` step reads (``autoglm_pipelines.finetune``), which holds a share of them out for
validation.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autoglm_api.spec import Retraining
from autoglm_core.feedback.store import RatedRequest

#: A retraining revision is not built from fewer training examples than this.
MIN_EXAMPLES = 8
DRIFT_PARTS = ("drift_prompt_length", "drift_vocabulary", "drift_score")


@dataclass(frozen=True)
class Trigger:
    reasons: tuple[str, ...]
    evidence: dict[str, Any]

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def trigger(
    spec: Retraining,
    *,
    revision: str,
    feedback_count: int,
    feedback_sum: float,
    drift: Mapping[str, float | None],
    since: int = 0,
) -> Trigger | None:
    """Whether ``revision``'s figures (its feedback over every prompt variant, its drift features)
    trigger retraining; ``since``: its feedback count at its last trigger (0: never triggered)."""
    if not spec.enabled:
        return None
    new = feedback_count - since
    if new < spec.min_feedback:
        return None
    score = feedback_sum / feedback_count if feedback_count else None
    statistic = drift.get("drift_statistic")
    reasons = []
    if score is not None and score < spec.feedback_score_below:
        reasons.append(
            f"mean feedback score {score:.3f} over {feedback_count} events is below feedbackScoreBelow "
            f"{spec.feedback_score_below:g}"
        )
    if statistic is not None and statistic > spec.drift_above:
        parts = ", ".join(
            f"{p.removeprefix('drift_')} {v:.3f}" for p in DRIFT_PARTS if (v := drift.get(p)) is not None
        )
        reasons.append(f"drift {statistic:.3f} ({parts}) is above driftAbove {spec.drift_above:g}")
    if not reasons:
        return None
    evidence = {
        "revision": revision, "feedback": feedback_count, "newFeedback": new, "meanScore": score,
        "drift": {k: drift.get(k) for k in ("drift_statistic", *DRIFT_PARTS)},
        "thresholds": {"feedbackScoreBelow": spec.feedback_score_below, "driftAbove": spec.drift_above,
                       "minFeedback": spec.min_feedback},
    }  # fmt: skip
    return Trigger(tuple(reasons), evidence)


def _conversation(prompt: str, system: str | None) -> list[dict[str, str]] | None:
    """The messages the model answered: a chat (JSON, as the request log keeps it) or a plain prompt,
    with the variant's system prompt first where the client sent none; None when the log's copy is
    not a usable conversation."""
    if prompt.startswith("["):
        try:
            raw = json.loads(prompt)
        except ValueError:
            return None
        messages = [
            {"role": str(m.get("role")), "content": str(m.get("content", ""))}
            for m in raw
            if isinstance(m, dict)
        ]
        if not messages or messages[-1]["role"] != "user":
            return None
    elif prompt.strip():
        messages = [{"role": "user", "content": prompt}]
    else:
        return None
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


@dataclass(frozen=True)
class Dataset:
    examples: tuple[dict[str, Any], ...]
    #: What was kept and why: for the ledger.
    counts: dict[str, Any]

    def jsonl(self) -> str:
        return "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in self.examples)


def dataset(rated: Sequence[RatedRequest], systems: Mapping[str, str]) -> Dataset:
    """The fine-tuning examples of ``rated`` (oldest first): corrections, and answers in the better
    half of the ratings; ``systems``: each prompt variant's system prompt."""
    scores = [r.score for r in rated if not r.correction]
    keep_above = statistics.median(scores) if scores else 1.0
    examples, corrections, low, unusable = [], 0, 0, 0
    for r in rated:
        messages = _conversation(r.prompt, systems.get(r.prompt_variant))
        target = (r.correction or "").strip() or None
        if target is None:
            if r.score < keep_above or r.score <= 0.0:
                low += 1
                continue
            target = r.output.strip()
        if messages is None or not target:
            unusable += 1
            continue
        corrections += bool(r.correction)
        examples.append({"messages": [*messages, {"role": "assistant", "content": target}]})
    counts = {
        "rated": len(rated), "kept": len(examples), "corrections": corrections, "lowScored": low,
        "unusable": unusable, "keepAbove": keep_above,
    }  # fmt: skip
    return Dataset(tuple(examples), counts)
