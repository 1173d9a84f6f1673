"""Temperature and nucleus sampling draws what transformers' logits warpers keep, in proportion."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from autoglm_inference.sampling import Sampling, _draw, row_generator, sample_row

DRAWS = 6000


def warped(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The oracle: transformers' warpers, as ``generate(do_sample=True)`` applies them."""
    scores = TemperatureLogitsWarper(sampling.temperature)(None, logits[None].clone())  # type: ignore[arg-type]
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)  # type: ignore[arg-type]
    return torch.softmax(scores[0], dim=-1)


def draw(logits: torch.Tensor, sampling: Sampling, draws: int = DRAWS) -> collections.Counter[int]:
    generator = row_generator(sampling)
    row = logits.numpy()
    return collections.Counter(sample_row(row, sampling, generator) for _ in range(draws))


@pytest.mark.parametrize(
    ("temperature", "top_p", "spread"),
    [(1.0, 1.0, 2.0), (0.7, 1.0, 2.0), (1.0, 0.9, 2.0), (0.7, 0.5, 1.0), (1.5, 0.95, 3.0), (1.0, 0.3, 4.0)],
)
def test_draws_only_what_transformers_keeps_and_in_proportion(
    temperature: float, top_p: float, spread: float
) -> None:
    for seed in range(3):
        logits = torch.randn(40, generator=torch.Generator().manual_seed(seed)) * spread
        sampling = Sampling(temperature, top_p, seed=seed)
        expected = warped(logits, sampling)
        kept = {int(i) for i in torch.nonzero(expected).flatten()}
        counts = draw(logits, sampling)
        assert set(counts) <= kept, (sorted(set(counts) - kept), sorted(kept))
        observed = [counts.get(i, 0) for i in sorted(kept)]
        if len(kept) == 1:
            assert observed == [DRAWS]
            continue
        shares = expected.double()[sorted(kept)]
        frequencies = (shares / shares.sum() * DRAWS).tolist()
        assert stats.chisquare(observed, frequencies).pvalue > 1e-4, (observed, frequencies)
        assert all(count > 0 for count, f in zip(observed, frequencies, strict=True) if f >= 20)


def test_a_nucleus_of_one_token_always_gives_it() -> None:
    logits = torch.tensor([0.0, 5.0, 1.0, 4.0])
    assert draw(logits, Sampling(1.0, 0.5, seed=3), 200) == {1: 200}  # p(1) = 0.71 > 0.5


def test_a_seed_repeats_its_draws_and_another_seed_does_not() -> None:
    logits = torch.randn(49152, generator=torch.Generator().manual_seed(0)) * 3  # a wide vocabulary
    for sampling in (Sampling(0.8, 1.0, seed=5), Sampling(0.8, 0.9, seed=5)):
        runs = [row_generator(sampling) for _ in range(2)]
        first = [sample_row(logits.numpy(), sampling, runs[0]) for _ in range(50)]
        again = [sample_row(logits.numpy(), sampling, runs[1]) for _ in range(50)]
        assert first == again
        other = row_generator(Sampling(0.8, sampling.top_p, seed=6))
        assert [sample_row(logits.numpy(), sampling, other) for _ in range(50)] != first


def test_a_wide_vocabulary_draws_from_its_nucleus() -> None:
    """SmolLM2's vocabulary size, logits spread so that the nucleus holds thousands of tokens."""
    logits = torch.randn(49152, generator=torch.Generator().manual_seed(1)) * 2
    sampling = Sampling(1.2, 0.9, seed=1)
    kept = warped(logits, sampling) > 0
    assert 1000 < int(kept.sum()) < 49152
    counts = draw(logits, sampling, 500)
    assert all(kept[token] for token in counts)


class Fixed:
    """A generator that always gives the same uniform number."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize("size", [1, 40, 255, 256, 257, 1000, 49152])
def test_a_draw_lands_on_a_weight_in_proportion_never_on_a_zero(size: int) -> None:
    """Across the blocks the draw searches in two levels, and at both ends of the uniform range
    (the last through the fallback for a point on a rounding edge)."""
    rng = np.random.default_rng(size)
    weights = rng.random(size).astype(np.float32)
    weights[rng.random(size) < 0.5] = 0.0
    weights[0] = weights[-1] = 0.0
    weights[size // 2] = 1.0
    positive = np.flatnonzero(weights)
    assert _draw(weights, Fixed(0.0)) == positive[0]  # type: ignore[arg-type]
    assert _draw(weights, Fixed(1.0 - 2.0**-53)) == positive[-1]  # type: ignore[arg-type]
    generator = np.random.default_rng(0)
    for fraction in np.linspace(0.0, 1.0, 97, endpoint=False):
        index = _draw(weights, Fixed(float(fraction)))  # type: ignore[arg-type]
        assert weights[index] > 0
        cumulative = np.cumsum(weights, dtype=np.float64)
        before = cumulative[index - 1] if index else 0.0
        assert before <= fraction * cumulative[-1] < cumulative[index]
    if 1 < len(positive) <= 600:  # enough draws for each weight
        counts = collections.Counter(_draw(weights, generator) for _ in range(DRAWS))
        assert set(counts) <= set(positive.tolist())
        shares = weights[positive].astype(np.float64)
        observed = [counts.get(int(i), 0) for i in positive]
        assert stats.chisquare(observed, shares / shares.sum() * DRAWS).pvalue > 1e-4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_logits_that_are_not_finite_fail_the_draw_not_give_a_token(bad: float) -> None:
    """As ``torch.multinomial`` refused them: the engine fails that request with the reason."""
    logits = np.zeros(300, dtype=np.float32)
    logits[7] = bad
    with pytest.raises(ValueError, match="not finite"):
        sample_row(logits, Sampling(0.8, 0.9, seed=1), row_generator(Sampling(0.8, 0.9, seed=1)))
    with pytest.raises(ValueError, match="not finite"):
        sample_row(np.full(300, -np.inf, dtype=np.float32), Sampling(1.0), row_generator(Sampling(1.0)))


@pytest.mark.parametrize("temperature", [1e-30, 1e-39, 1e-300])
def test_a_temperature_near_zero_draws_the_most_probable_token(temperature: float) -> None:
    """The limit of the rule, as the request's schema allows any temperature above 0 (1e-39 made
    the scaled logits overflow to NaN and failed the batch)."""
    logits = np.linspace(-50.0, 60.0, 1000, dtype=np.float32)[::-1].copy()
    sampling = Sampling(temperature, 0.9, seed=2)
    generator = row_generator(sampling)
    assert {sample_row(logits, sampling, generator) for _ in range(20)} == {0}
