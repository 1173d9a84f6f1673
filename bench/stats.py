"""How sure a benchmark's median ratio is: a distribution-free confidence interval for a median.

Rounds on a shared machine spread widely (single rounds of one comparison read 0.85-1.19x), so a
median alone cannot say whether a runtime is at, above or below its anchor. The interval is the
classic one from order statistics (the sign test inverted, as ``scipy.stats.quantile_test`` gives
it): it assumes nothing of the rounds' distribution, only that they are independent. Written here
rather than taken from scipy because the benchmarks run where only the runtime's dependencies are
installed; the tests check it against scipy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """The narrowest interval ``(x[k], x[n-1-k])`` of the sorted values that holds the median with at
    least ``confidence`` (``nan`` bounds when there are too few values for it: 6 at 95%)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence is between 0 and 1, got {confidence}")
    ordered = sorted(values)
    n = len(ordered)
    # The k-th smallest is at or above the median when at most k values fall below it: P(B <= k)
    # for B ~ Binomial(n, 1/2). Take the largest k whose two tails together stay within 1 - confidence.
    below, k = 0.0, -1
    while n and k + 1 < n / 2:
        tail = below + math.comb(n, k + 1) / 2**n
        if 2 * tail > 1 - confidence:
            break
        below, k = tail, k + 1
    if k < 0:
        return math.nan, math.nan
    return ordered[k], ordered[n - 1 - k]


def describe_ratios(values: Sequence[float], confidence: float = 0.95) -> str:
    """``median 0.99x (95% interval 0.970-1.010x: ...), 6 of 25 at or above 1.00``: the bounds to three
    places (1.003 is above the anchor, 0.998 is not), and what the interval says: below, level with, or
    above the anchor at that confidence."""
    if not values:
        return "no rounds"
    low, high = median_interval(values, confidence)
    above = sum(v >= 1.0 for v in values)
    text = f"median {statistics.median(values):.2f}x"
    if math.isnan(low):
        return f"{text}, {above} of {len(values)} at or above 1.00 (too few rounds for an interval)"
    low, high = round(low, 3), round(high, 3)  # judged as printed: 0.9996 reads 1.000, level
    if low > 1.0:
        verdict = "above the anchor"
    elif high < 1.0:
        verdict = "below the anchor"
    else:
        verdict = "level with the anchor: the interval holds 1.00"
    percent = f"{confidence * 100:g}%"
    return f"{text} ({percent} interval {low:.3f}-{high:.3f}x: {verdict}), {above} of {len(values)} at or above 1.00"


def group_medians(values: Sequence[float], groups: Sequence[int]) -> list[float]:
    """The median of each group's values, groups in the order they first appear (``groups[i]`` is the
    group of ``values[i]``). Rounds measured in the same processes share those processes' luck (two
    loads of one server read 0.95x of each other over 14 rounds here), so an interval over rounds is
    too narrow; one over the loads' medians is not."""
    if len(values) != len(groups):
        raise ValueError(f"{len(values)} values but {len(groups)} group labels")
    members: dict[int, list[float]] = {}
    for value, group in zip(values, groups, strict=True):
        members.setdefault(group, []).append(value)
    return [statistics.median(v) for v in members.values()]
