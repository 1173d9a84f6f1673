"""The bandit policies: what each does with evidence, checked against closed forms and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from autoglm_feedback.bandits import UCB1, Reinforce, ThompsonSampling, make_policy, moved_share

NAMES = ["a", "b", "c"]


def test_thompson_p_best_is_the_posterior_probability_of_being_best() -> None:
    policy = ThompsonSampling(NAMES, seed=1, draws=200_000)
    policy.set_evidence({"a": (40, 30), "b": (40, 20), "c": (0, 0)})
    shares = policy.p_best()
    assert sum(shares.values()) == pytest.approx(1.0)
    # Oracle: P(max) by numerical integration over scipy's Beta densities.
    grid = np.linspace(0, 1, 20001)
    dists = {"a": stats.beta(31, 11), "b": stats.beta(21, 21), "c": stats.beta(1, 1)}
    for name, dist in dists.items():
        others = np.prod([d.cdf(grid) for n, d in dists.items() if n != name], axis=0)
        expected = np.trapezoid(dist.pdf(grid) * others, grid)
        assert shares[name] == pytest.approx(expected, abs=0.005)


def test_thompson_gives_the_likely_best_arm_its_floor_and_the_rest_in_proportion() -> None:
    policy = ThompsonSampling(NAMES, seed=1, draws=100_000)
    policy.set_evidence({"a": (40, 30), "b": (40, 20), "c": (0, 0)})  # P(a best) about 0.74
    p, shares = policy.p_best(), policy.shares()
    assert 0.5 <= p["a"] < 0.8
    assert shares["a"] == 0.8
    assert shares["b"] / shares["c"] == pytest.approx(p["b"] / p["c"])
    assert sum(shares.values()) == pytest.approx(1.0)
    plain = ThompsonSampling(NAMES, seed=1, draws=100_000, leader_floor=0.0)
    plain.set_evidence({"a": (40, 30), "b": (40, 20), "c": (0, 0)})
    assert plain.shares() == p  # no floor: probability matching
    policy.set_evidence({"a": (40, 22), "b": (40, 20), "c": (0, 0)})  # nobody likely best: no floor
    assert max(policy.p_best().values()) < 0.5
    assert policy.shares() == policy.p_best()
    policy.set_evidence({"a": (400, 300), "b": (400, 200), "c": (100, 20)})  # past the floor already
    assert policy.shares() == policy.p_best()
    assert policy.shares()["a"] > 0.99
    with pytest.raises(ValueError, match="leader_floor"):
        ThompsonSampling(NAMES, leader_floor=1.0)
    with pytest.raises(ValueError, match=r"floor_lead at least 1, got 0\.8, 0\.5, 0\.5"):
        ThompsonSampling(NAMES, floor_lead=0.5)


def test_two_tied_arms_get_no_floor_and_a_clear_leader_of_two_does() -> None:
    """Of two arms one is always at least 0.5 likely the best: a tie (0.503 by Monte Carlo noise)
    moved 80% of traffic until the floor also asked for 1.5 times the runner-up's probability."""
    policy = ThompsonSampling(["a", "b"], seed=1)
    policy.set_evidence({"a": (100, 50), "b": (100, 50)})
    assert policy.shares() == policy.p_best()
    assert max(policy.shares().values()) < 0.6
    policy.set_evidence({"a": (100, 54), "b": (100, 50)})  # about 0.72: the floor
    assert 0.6 <= policy.p_best()["a"] < 0.8
    assert policy.shares() == {"a": 0.8, "b": pytest.approx(0.2)}


def test_thompson_choices_follow_the_shares_recomputed_every_ten_events() -> None:
    policy = ThompsonSampling(NAMES, seed=1)
    policy.set_evidence({"a": (40, 30), "b": (40, 20), "c": (0, 0)})
    rng = np.random.default_rng(3)
    picks = [policy.choose(rng) for _ in range(20_000)]
    shares = policy.shares()
    for name in NAMES:
        assert picks.count(name) / len(picks) == pytest.approx(shares[name], abs=0.01)
    policy.set_evidence({"a": (0, 0), "b": (400, 390), "c": (0, 0)})  # new evidence: new shares at once
    assert [policy.choose(rng) for _ in range(2000)].count("b") / 2000 > 0.9  # b had about 10% before


def test_ucb1_tries_every_arm_first_then_follows_the_bound() -> None:
    policy = UCB1(NAMES, exploration=math.sqrt(2))
    policy.set_evidence({"a": (10, 9), "b": (10, 2)})
    assert policy.shares() == {"a": 0.0, "b": 0.0, "c": 1.0}
    policy.set_evidence({"a": (10, 9), "b": (10, 2), "c": (100, 50)})
    bounds = policy.bounds()
    assert bounds["a"] == pytest.approx(0.9 + math.sqrt(2) * math.sqrt(math.log(120) / 10))
    assert policy.shares()["a"] == 1.0


def test_reinforce_moves_preference_toward_the_better_arm_and_rebuilds_deterministically() -> None:
    policy = Reinforce(NAMES, learning_rate=0.2)
    rng = np.random.default_rng(0)
    for _ in range(3000):
        arm = policy.choose(rng)
        policy.update(arm, float(rng.random() < {"a": 0.8, "b": 0.5, "c": 0.2}[arm]))
    assert max(policy.shares(), key=policy.shares().get) == "a"  # type: ignore[arg-type]
    evidence = {n: (a.n, a.total) for n, a in policy.arms.items()}
    one, two = Reinforce(NAMES, learning_rate=0.2), Reinforce(NAMES, learning_rate=0.2)
    one.set_evidence(evidence)
    two.set_evidence(evidence)
    assert one.shares() == two.shares()
    assert max(one.shares(), key=one.shares().get) == "a"


@pytest.mark.parametrize("algorithm", ["thompson", "ucb", "reinforce", "epsilon-greedy"])
def test_each_policy_finds_the_best_of_three_arms(algorithm: str) -> None:
    policy = make_policy(algorithm, NAMES)
    rng = np.random.default_rng(7)
    truth = {"a": 0.3, "b": 0.7, "c": 0.5}
    chosen = []
    for _ in range(3000):
        arm = policy.choose(rng)
        policy.update(arm, float(rng.random() < truth[arm]))
        chosen.append(arm)
    assert chosen[-1000:].count("b") > 700


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown bandit algorithm 'bogus'"):
        make_policy("bogus", NAMES)
    with pytest.raises(ValueError, match="distinct arm names"):
        make_policy("ucb", ["a", "a"])
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 2"):
        make_policy("ucb", NAMES).update("a", 2.0)


def test_moved_share_is_the_total_variation_distance() -> None:
    assert moved_share({"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.1}) == pytest.approx(0.4)
    assert moved_share({"a": 1.0}, {"b": 1.0}) == pytest.approx(1.0)
