"""Drift statistics against scipy's KL divergence, and the histograms they compare."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import entropy

from autoglm_feedback.drift import Window, compare, kl, length_histogram, psi, score_histogram


def test_psi_is_the_symmetric_kl_divergence() -> None:
    p, q = np.array([10.0, 20, 30, 40]), np.array([25.0, 25, 25, 25])
    assert psi(q, p) == pytest.approx(
        entropy(p / p.sum(), q / q.sum()) + entropy(q / q.sum(), p / p.sum()), rel=1e-3
    )
    assert kl(q, p) == pytest.approx(entropy(p / p.sum(), q / q.sum()), rel=1e-3)
    assert psi(p, p) == pytest.approx(0.0, abs=1e-12)


def test_histograms_bin_lengths_and_scores() -> None:
    assert length_histogram([1, 3, 3, 5000])[1:3] == [1.0, 2.0]
    assert length_histogram([5000])[-1] == 1.0
    assert score_histogram([0.0, 0.19, 0.2, 1.0]) == [2.0, 1.0, 0.0, 0.0, 1.0]


def test_a_shift_in_prompt_length_is_drift_and_the_same_traffic_is_not() -> None:
    rng = np.random.default_rng(0)
    words = ["hamlet", "king", "queen", "ghost", "sword", "poison"]
    text = lambda n: [" ".join(rng.choice(words, 5)) for _ in range(n)]  # noqa: E731
    reference = Window.of(rng.integers(8, 32, 500), text(500), rng.random(500))
    same = Window.of(rng.integers(8, 32, 500), text(500), rng.random(500))
    longer = Window.of(rng.integers(200, 800, 500), text(500), rng.random(500))
    assert compare(reference, same).statistic < 0.05
    drift = compare(reference, longer)
    assert drift.prompt_length is not None
    assert drift.prompt_length > 1.0
    assert drift.statistic == drift.prompt_length
    assert compare(reference, Window.of([10], ["x"], [])).statistic == 0.0  # too few events: not measured
