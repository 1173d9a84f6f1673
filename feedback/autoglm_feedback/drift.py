"""Drift of what users send and say, against a reference window (pure code, numpy only).

Three distributions are compared, each as a histogram over fixed bins so that a reference can be
kept as a few numbers: prompt length in tokens (log-spaced bins), vocabulary (words hashed into
``VOCAB_BINS`` buckets) and feedback scores (five bins over [0, 1]). Each comparison is the
population stability index, PSI = sum((p - q) * ln(p / q)) over bins (the symmetric KL divergence),
with a small floor on empty bins; ``kl`` is the one-sided KL(p || q). The usual reading of PSI:
below 0.1 no shift, 0.1-0.25 moderate, above 0.25 a large shift. The drift statistic is the
largest of the three.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

#: Prompt-length bin edges in tokens: 1, 2, 4, ... 4096 and beyond.
LENGTH_EDGES = tuple(float(2**i) for i in range(13))
VOCAB_BINS = 64
SCORE_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
#: The share given to an empty bin (so ln(p/q) is finite).
FLOOR = 1e-4
_WORD = re.compile(r"[a-z0-9']+")


def _normalise(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=float)
    total = counts.sum()
    p: np.ndarray = counts / total if total > 0 else np.full(len(counts), 1.0 / len(counts))
    p = np.maximum(p, FLOOR)
    shares: np.ndarray = p / p.sum()
    return shares


def psi(reference: Sequence[float], current: Sequence[float]) -> float:
    """Population stability index of two histograms (counts or shares over the same bins)."""
    p, q = _normalise(np.asarray(current)), _normalise(np.asarray(reference))
    return float(np.sum((p - q) * np.log(p / q)))


def kl(reference: Sequence[float], current: Sequence[float]) -> float:
    """KL(current || reference) of two histograms over the same bins."""
    p, q = _normalise(np.asarray(current)), _normalise(np.asarray(reference))
    return float(np.sum(p * np.log(p / q)))


def length_histogram(lengths: Iterable[int]) -> list[float]:
    values = np.asarray(list(lengths), dtype=float)
    counts = np.zeros(len(LENGTH_EDGES) + 1)
    if len(values):
        np.add.at(counts, np.searchsorted(LENGTH_EDGES, values, side="right"), 1.0)
    return counts.tolist()


def vocabulary_histogram(texts: Iterable[str]) -> list[float]:
    counts = np.zeros(VOCAB_BINS)
    for text in texts:
        for word in _WORD.findall(text.lower()):
            counts[zlib.crc32(word.encode()) % VOCAB_BINS] += 1.0
    return counts.tolist()


def score_histogram(scores: Iterable[float]) -> list[float]:
    values = np.clip(np.asarray(list(scores), dtype=float), 0.0, 1.0)
    counts = np.zeros(len(SCORE_EDGES) - 1)
    if len(values):
        idx = np.minimum(np.searchsorted(SCORE_EDGES, values, side="right") - 1, len(counts) - 1)
        np.add.at(counts, idx, 1.0)
    return counts.tolist()


@dataclass(frozen=True)
class Window:
    """The histograms of one window of traffic (and how many events made each)."""

    lengths: list[float]
    vocabulary: list[float]
    scores: list[float]

    @classmethod
    def of(cls, prompt_lengths: Iterable[int], prompts: Iterable[str], scores: Iterable[float]) -> Window:
        return cls(length_histogram(prompt_lengths), vocabulary_histogram(prompts), score_histogram(scores))

    def to_json(self) -> dict[str, list[float]]:
        return {"lengths": self.lengths, "vocabulary": self.vocabulary, "scores": self.scores}

    @classmethod
    def from_json(cls, data: dict[str, list[float]]) -> Window:
        return cls(list(data["lengths"]), list(data["vocabulary"]), list(data["scores"]))


@dataclass(frozen=True)
class Drift:
    """PSI of each distribution against the reference, and the largest (the drift statistic)."""

    prompt_length: float | None
    vocabulary: float | None
    score: float | None

    @property
    def statistic(self) -> float:
        return max(
            (v for v in (self.prompt_length, self.vocabulary, self.score) if v is not None), default=0.0
        )

    def to_json(self) -> dict[str, float | None]:
        return {
            "promptLength": self.prompt_length, "vocabulary": self.vocabulary, "score": self.score,
            "statistic": self.statistic,
        }  # fmt: skip


def compare(reference: Window, current: Window, *, min_events: int = 30) -> Drift:
    """Each distribution's PSI, None where either window has fewer than ``min_events`` events."""

    def one(ref: list[float], cur: list[float]) -> float | None:
        if sum(ref) < min_events or sum(cur) < min_events:
            return None
        return round(psi(ref, cur), 6)

    return Drift(
        one(reference.lengths, current.lengths),
        one(reference.vocabulary, current.vocabulary),
        one(reference.scores, current.scores),
    )
