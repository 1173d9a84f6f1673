"""The variants file's weights: the policy's traffic shares, applied per chat request by the server."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from scipy.stats import binomtest

from autoglm_inference.prompts import PromptVariants, Variants

TEXTS = {"concise": "Be brief.", "detailed": "Explain step by step."}


def test_requests_get_variants_in_the_published_shares(tmp_path: Path) -> None:
    path = tmp_path / "variants.yaml"
    path.write_text(
        "active: concise\nweights: {concise: 3, detailed: 1}\nvariants: {concise: Be brief., detailed: Explain.}\n"
    )
    variants = PromptVariants(path)
    assert variants.current().weights == {"concise": 0.75, "detailed": 0.25}
    drawn = Counter(variants.resolve(None)[0] for _ in range(4000))
    assert binomtest(drawn["concise"], 4000, 0.75).pvalue > 1e-4
    assert variants.resolve("detailed") == ("detailed", "Explain.")  # a pinned variant wins
    # The loop rewrites the file: the new shares apply from the next request.
    path.write_text(
        "active: detailed\nweights: {concise: 0, detailed: 1}\nvariants: {concise: Be brief., detailed: Explain.}\n"
    )
    os.utime(path, (1, 1))
    assert {variants.resolve(None)[0] for _ in range(200)} == {"detailed"}


@pytest.mark.parametrize(
    "weights",
    [{"unknown": 1.0}, {"concise": -1.0}, {"concise": 0, "detailed": 0}, {"concise": True}, ["concise"]],
)
def test_bad_weights_are_refused_naming_the_variants(weights: object) -> None:
    with pytest.raises(ValueError, match=r"weights"):
        Variants.parse({"active": "concise", "variants": TEXTS, "weights": weights}, "variants.yaml")
