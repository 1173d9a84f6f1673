"""Figures from the servers' own /metrics: the difference of two scrapes, per revision."""

from __future__ import annotations

import math

import pytest

from autoglm_operator.metrics import figures, parse

PAGE = """\
# HELP autoglm_request_duration_seconds Request latency
# TYPE autoglm_request_duration_seconds histogram
autoglm_request_duration_seconds_bucket{{le="0.1",model="m",prompt_variant="none",revision="a",target="local"}} {a1}
autoglm_request_duration_seconds_bucket{{le="0.2",model="m",prompt_variant="none",revision="a",target="local"}} {a2}
autoglm_request_duration_seconds_bucket{{le="+Inf",model="m",prompt_variant="none",revision="a",target="local"}} {a3}
autoglm_request_duration_seconds_count{{model="m",prompt_variant="none",revision="a",target="local"}} {a3}
autoglm_request_duration_seconds_sum{{model="m",prompt_variant="none",revision="a",target="local"}} 1.0
autoglm_request_duration_seconds_bucket{{le="0.1",model="m",prompt_variant="concise",revision="a",target="local"}} 1
autoglm_request_duration_seconds_bucket{{le="0.2",model="m",prompt_variant="concise",revision="a",target="local"}} 1
autoglm_request_duration_seconds_bucket{{le="+Inf",model="m",prompt_variant="concise",revision="a",target="local"}} 1
autoglm_request_duration_seconds_count{{model="m",prompt_variant="concise",revision="a",target="local"}} 1
autoglm_request_duration_seconds_sum{{model="m",prompt_variant="concise",revision="a",target="local"}} 0.05
# TYPE autoglm_errors counter
autoglm_errors_total{{code="500",model="m",prompt_variant="none",revision="a",target="local"}} {errors}
# TYPE autoglm_tokens counter
autoglm_tokens_total{{direction="out",model="m",prompt_variant="none",revision="a",target="local"}} {tokens}
autoglm_tokens_total{{direction="in",model="m",prompt_variant="none",revision="a",target="local"}} 999
# TYPE autoglm_energy_joules counter
autoglm_energy_joules_total{{method="rapl",model="m",prompt_variant="none",revision="a",target="local"}} {joules}
"""


def page(a1: int, a2: int, a3: int, errors: int, tokens: int, joules: float) -> str:
    return PAGE.format(a1=a1, a2=a2, a3=a3, errors=errors, tokens=tokens, joules=joules)


def test_a_revisions_figures_are_summed_over_variants_and_differenced_between_scrapes() -> None:
    earlier = parse(page(2, 3, 4, 0, 40, 8.0))
    later = parse(page(5, 9, 12, 2, 140, 28.0))
    got = figures(later, earlier, "m", "a")
    assert got is not None
    assert (got.requests, got.errors) == (8 + 2, 2)  # 8 more finished, 2 errors
    assert got.latency is not None
    assert got.latency.bounds == (100.0, 200.0, math.inf)
    assert got.latency.counts == (3, 3, 2)  # the concise variant's one request is in both scrapes
    assert got.joules_per_token == pytest.approx(20.0 / 100)
    assert figures(later, None, "m", "a").requests == 12 + 1 + 2  # type: ignore[union-attr]
    assert figures(later, earlier, "m", "b") is None  # a revision the server does not know
