"""The benchmarks' confidence interval for a median, against scipy's (the sign test inverted)."""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

_spec = importlib.util.spec_from_file_location(
    "bench_stats", Path(__file__).resolve().parents[2] / "bench" / "stats.py"
)
assert _spec is not None
assert _spec.loader is not None
bench_stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_stats)


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_median_interval_is_scipys(confidence: float) -> None:
    rng = random.Random(7)
    for n in range(1, 90):
        values = [rng.lognormvariate(0, 0.05) for _ in range(n)]
        low, high = bench_stats.median_interval(values, confidence)
        expected = scipy_stats.quantile_test(values, q=0.5, p=0.5).confidence_interval(confidence)
        if math.isnan(expected.low):  # too few values for that confidence
            assert math.isnan(low), n
            assert math.isnan(high), n
        else:
            assert (low, high) == (float(expected.low), float(expected.high)), n


def test_too_few_rounds_get_no_interval_and_say_so() -> None:
    # 5 values: the widest interval (min, max) holds the median with 1 - 2/32 = 93.75% < 95%.
    assert all(math.isnan(b) for b in bench_stats.median_interval([1.0, 0.9, 1.1, 1.0, 0.95]))
    assert "too few rounds" in bench_stats.describe_ratios([1.0, 0.9, 1.1, 1.0, 0.95])
    with pytest.raises(ValueError, match="between 0 and 1"):
        bench_stats.median_interval([1.0], 1.0)


@pytest.mark.parametrize(
    ("values", "verdict"),
    [
        ([1.02, 1.03, 1.05, 1.01, 1.04, 1.06, 1.02, 1.03, 1.01, 1.05], "above the anchor"),
        ([0.97, 0.98, 0.96, 0.99, 0.95, 0.98, 0.97, 0.99, 0.96, 0.98], "below the anchor"),
        ([0.97, 1.02, 0.99, 1.01, 0.98, 1.03, 1.0, 0.96, 1.01, 0.99], "level with the anchor"),
    ],
)
def test_describe_ratios_says_where_the_interval_lies(values: list[float], verdict: str) -> None:
    text = bench_stats.describe_ratios(values)
    assert verdict in text
    assert f"of {len(values)} at or above 1.00" in text


def test_the_verdict_is_what_the_printed_bounds_say() -> None:
    # the upper bound 0.9996 prints as 1.000: the interval as printed holds 1.00
    values = [0.97, 0.98, 0.9996, 0.96, 0.99, 0.98, 0.97, 0.99, 0.98, 0.9996]
    assert bench_stats.median_interval(values)[1] == 0.9996
    text = bench_stats.describe_ratios(values)
    assert "-1.000x: level with the anchor" in text


def test_group_medians_take_each_loads_rounds_apart() -> None:
    """Rounds measured in the same processes are summarised per load, in the loads' order, each the
    median numpy gives for its own rounds."""
    rng = random.Random(3)
    loads = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    values = [rng.lognormvariate(0, 0.05) for _ in loads]
    expected = [
        float(np.median([v for v, g in zip(values, loads, strict=True) if g == group])) for group in (0, 1, 2)
    ]
    assert bench_stats.group_medians(values, loads) == pytest.approx(expected)
    assert bench_stats.group_medians([1.0, 2.0], [5, 4]) == [1.0, 2.0]  # first seen, first out
    with pytest.raises(ValueError, match="2 values but 1 group"):
        bench_stats.group_medians([1.0, 2.0], [0])
