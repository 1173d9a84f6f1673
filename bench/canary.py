"""The canary judge on seeded synthetic traffic: how often it fails a good canary, and how fast it
catches a bad one, at 50 requests per interval for each revision.

Each interval draws request latencies (lognormal, median ``--median-ms``, sigma ``--sigma``) and
errors (Bernoulli) for stable and candidate, records the latencies into the server's histogram
buckets (``autoglm_inference.telemetry.LATENCY_BUCKETS``, as Prometheus would see them), and asks
``autoglm_operator.canary.judge`` for the outcome. A canary is rolled back at ``failureLimit``
Failed intervals. By default each interval is judged on the figures since the canary step began
(``--window cumulative``, what ``increase(...[step])`` gives in PromQL), so later intervals judge
more requests; ``--window interval`` judges each interval's requests alone.

The k-th judgement of a step tests candidate against stable at ``ALPHA / (k (k + 1))``
(``canary.look_alpha``: the significance is spent over the looks at the same growing window); the
same canaries judged at a fixed significance (every look at ``ALPHA / 2``, what the first look
gets) show what the spending buys.

Printed, each over ``--trials`` seeded canaries:
- equal revisions: the share of intervals judged Failed (target <= 5%), and of canaries rolled back
  within ``--canary-intervals`` intervals (target <= ALPHA), with spending and at a fixed
  significance, and the ratio of the two;
- a 30% latency regression and a 5-point error-rate increase: the share caught (rolled back)
  within ``failureLimit`` intervals (target >= 90%).

    python bench/canary.py [--trials 2000] [--requests 50] [--seed 0]
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from autoglm_api.spec import Analysis
from autoglm_inference.telemetry import LATENCY_BUCKETS
from autoglm_operator.canary import ALPHA, FAILED, Figures, Histogram, judge

BOUNDS_MS = (*(b * 1000 for b in LATENCY_BUCKETS), math.inf)


def interval(rng: np.random.Generator, n: int, median_ms: float, sigma: float, error_rate: float) -> Figures:
    latencies = rng.lognormal(math.log(median_ms), sigma, n)
    errors = int(rng.binomial(n, error_rate))
    return Figures(requests=n, errors=errors, latency=Histogram.of(latencies, BOUNDS_MS))


def run(
    args: argparse.Namespace,
    limits: Analysis,
    *,
    slower: float,
    extra_errors: float,
    intervals: int,
    spend: bool = True,
) -> tuple[float, float, float]:
    """Shares of intervals judged Failed, of canaries rolled back within ``intervals``, and of
    canaries with at least one Failed interval within ``intervals``. ``spend`` False judges every
    look as the first (a fixed significance)."""
    rng = np.random.default_rng(args.seed)
    failed_intervals = rolled_back = first_failed = 0
    for _ in range(args.trials):
        failures = 0
        stable: Figures | None = None
        candidate: Figures | None = None
        for look in range(1, intervals + 1):
            new_stable = interval(rng, args.requests, args.median_ms, args.sigma, args.error_rate)
            new_candidate = interval(
                rng, args.requests, args.median_ms * (1 + slower), args.sigma, args.error_rate + extra_errors
            )
            if args.window == "cumulative" and stable is not None and candidate is not None:
                stable, candidate = stable + new_stable, candidate + new_candidate
            else:
                stable, candidate = new_stable, new_candidate
            if judge(candidate, stable, limits, look=look if spend else 1).outcome == FAILED:
                failures += 1
                failed_intervals += 1
                first_failed += failures == 1
                if failures >= limits.failure_limit:
                    rolled_back += 1
                    break
    n = args.trials
    return failed_intervals / (n * intervals), rolled_back / n, first_failed / n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=50, help="requests per interval, each revision")
    parser.add_argument("--median-ms", type=float, default=400.0)
    parser.add_argument("--sigma", type=float, default=0.35, help="lognormal sigma of request latency")
    parser.add_argument("--error-rate", type=float, default=0.0, help="the stable revision's error rate")
    parser.add_argument("--canary-intervals", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--window",
        choices=["cumulative", "interval"],
        default="cumulative",
        help="judge the figures since the canary step began (what increase(...[step]) gives), or each interval alone",
    )
    args = parser.parse_args()
    limits = Analysis(
        min_requests=args.requests, max_error_rate=0.01, max_p95_latency_ms=5000.0, failure_limit=2
    )

    print(f"{args.trials} seeded canaries, {args.requests} requests per interval and revision, latency lognormal "
          f"median {args.median_ms:.0f} ms sigma {args.sigma}, stable error rate {args.error_rate:.1%}, "
          f"failureLimit {limits.failure_limit}, maxErrorRate {limits.max_error_rate}, judged on {args.window} "
          "figures")  # fmt: skip
    print(f"latency buckets (ms): {', '.join(f'{b:g}' for b in BOUNDS_MS)}")
    equal_intervals, equal_rollbacks, _ = run(
        args, limits, slower=0.0, extra_errors=0.0, intervals=args.canary_intervals
    )
    _, fixed_rollbacks, _ = run(
        args, limits, slower=0.0, extra_errors=0.0, intervals=args.canary_intervals, spend=False
    )
    _, slow, slow_first = run(args, limits, slower=0.30, extra_errors=0.0, intervals=limits.failure_limit)
    _, errors, errors_first = run(args, limits, slower=0.0, extra_errors=0.05, intervals=limits.failure_limit)
    k = limits.failure_limit
    rows = [
        ("equal revisions: intervals judged Failed", equal_intervals, "<= 5%", equal_intervals <= 0.05),
        (
            f"equal revisions: canaries rolled back in {args.canary_intervals} intervals",
            equal_rollbacks,
            f"<= {ALPHA:.0%}",
            equal_rollbacks <= ALPHA,
        ),
        (f"  the same at a fixed significance {ALPHA / 2:g}", fixed_rollbacks, "", None),
        (f"30% slower: rolled back within {k} intervals", slow, ">= 90%", slow >= 0.90),
        (f"30% slower: a Failed interval within {k} intervals", slow_first, "", None),
        (f"+5 points errors: rolled back within {k} intervals", errors, ">= 90%", errors >= 0.90),
        (f"+5 points errors: a Failed interval within {k} intervals", errors_first, "", None),
    ]
    for label, value, target, met in rows:
        mark = "" if met is None else ("met" if met else "NOT met")
        print(f"{label:58} {value:7.1%}  {target:>7} {mark}")
    if equal_rollbacks:
        print(
            f"false rollbacks at a fixed significance / with spending: {fixed_rollbacks / equal_rollbacks:.1f}x"
        )
    else:
        print(f"false rollbacks: none with spending, {fixed_rollbacks:.1%} at a fixed significance")


if __name__ == "__main__":
    main()
