"""Temperature and nucleus (top-p) sampling of one row's next token, for every runtime.

The rule is transformers' (``TemperatureLogitsWarper``, then ``TopPLogitsWarper``): divide the
logits by the temperature, keep a token when the probability of the tokens more probable than it
is below ``top_p``, and draw from what is kept in proportion to its probability.

A draw never sorts the vocabulary. It draws from every token by inverting the cumulative
probability at one uniform number from the row's generator, and keeps the token if it is in the
nucleus; if not, no token as improbable is either, and it draws again among the more probable ones
(rejection sampling, as FlashInfer's top-p sampler: what is kept is drawn in proportion to its
probability, and a first draw is in the nucleus with probability at least ``top_p``). Sorting
SmolLM2's 49152 probabilities took 2.9 ms and ``torch.multinomial`` 1 ms per token here, on the
thread that decodes: a Q4_0 decode step on two cores is about 8 ms.

Tokens tied in probability with one at the edge of the nucleus are all kept or all left out
(a sort would keep some of them, in whatever order it put them).

In numpy, on the thread that calls it, for both runtimes (the torch one hands its row's logits
over, from the GPU too). Run with torch's operators on the llama.cpp runtime's thread, the draw
woke torch's thread pool, whose workers then spun on the cores llama.cpp decodes on: sampled decode
streamed at 0.28x of llama-server's rate (0.51x with the draw above, still in torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Sampling", "row_generator", "sample_row"]

_BLOCK = 256
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is 0; otherwise temperature and nucleus (``top_p``) sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


def row_generator(sampling: Sampling) -> np.random.Generator | None:
    """A row's random generator: None when greedy, seeded when the request gives a seed."""
    if sampling.temperature <= 0:
        return None
    return np.random.default_rng(sampling.seed)


def sample_row(logits: np.ndarray, sampling: Sampling, generator: np.random.Generator | None) -> int:
    """One token id from a row's logits (1-D): temperature, then the nucleus within ``top_p``."""
    if generator is None:
        raise ValueError("a sampled row needs its generator (row_generator)")
    top = float(np.max(logits))
    if not math.isfinite(top):  # NaN or +inf among the logits, or every one -inf
        raise ValueError(f"cannot sample from these logits: not finite (their max is {top})")
    scale = 1.0 / sampling.temperature
    if scale > _FLOAT32_MAX:  # a temperature this close to 0 is greedy: its limit, not NaN
        return int(np.argmax(logits))
    probs = np.subtract(logits, np.float32(top), dtype=np.float32)  # the max first: no overflow
    with np.errstate(over="ignore"):  # far below the max: -inf, a probability of 0
        probs *= np.float32(scale)
    np.exp(probs, out=probs)
    total = float(probs.sum(dtype=np.float64))
    probs *= np.float32(1.0 / total)  # dividing by a float64 scalar took 72 us, this 6
    if sampling.top_p >= 1.0:
        return _draw(probs, generator)
    weights = probs
    while True:
        token = _draw(weights, generator)
        above = probs * (probs > probs[token])
        if float(above.sum(dtype=np.float64)) < sampling.top_p:
            return token
        weights = above  # it is out, and so is every token as improbable


def _draw(weights: np.ndarray, generator: np.random.Generator) -> int:
    """An index drawn in proportion to ``weights`` (1-D, not negative, some positive): the first
    whose cumulative weight passes a uniform point of the total, never one of weight 0. Found in two
    levels, blocks of ``_BLOCK`` then one block: numpy's ``cumsum`` over SmolLM2's 49152 weights
    took 259 us, this 35 us."""
    fraction = generator.random()
    size = weights.shape[0]
    whole = size - size % _BLOCK
    sums = weights[:whole].reshape(-1, _BLOCK).sum(axis=1, dtype=np.float64)
    if whole < size:
        sums = np.append(sums, weights[whole:].sum(dtype=np.float64))
    ends = np.cumsum(sums)
    point = fraction * ends[-1]
    block = int(np.searchsorted(ends, point, side="right"))
    if block < len(ends):
        start = block * _BLOCK
        piece = weights[start : start + _BLOCK]
        inner = np.cumsum(piece, dtype=np.float64)
        inner += ends[block - 1] if block else 0.0
        index = int(np.searchsorted(inner, point, side="right"))
        if index < len(piece) and piece[index] > 0:
            return start + index
    # The point fell on a rounding edge between two blocks' sums: once more over one cumulative sum.
    cumulative = np.cumsum(weights, dtype=np.float64)
    index = int(np.searchsorted(cumulative, fraction * cumulative[-1], side="right"))
    return min(index, int(np.flatnonzero(weights)[-1]))
