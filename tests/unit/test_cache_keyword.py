"""The KV cache reaches the model under the keyword its transformers release declares (5.23 and 5.24+)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

from autoglm_modeling.loading import cache_kwargs
from tests.support.tiny_models import tiny_glm


class OldForward(nn.Module):  # transformers <= 5.23
    def forward(
        self, input_ids: torch.Tensor, past_key_values: object = None, use_cache: bool = False
    ) -> None:
        raise AssertionError("not called")


class NewForward(nn.Module):  # transformers >= 5.24
    def forward(self, input_ids: torch.Tensor, cache: object = None, use_cache: bool = False) -> None:
        raise AssertionError("not called")


def test_each_release_gets_its_own_keyword() -> None:
    cache = DynamicCache()
    assert cache_kwargs(OldForward(), cache) == {"past_key_values": cache, "use_cache": True}
    assert cache_kwargs(NewForward(), cache) == {"cache": cache, "use_cache": True}


def test_the_installed_transformers_fills_the_cache_without_a_deprecation(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_glm(tmp_path / "m")).eval()
    cache = DynamicCache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning for a renamed keyword fails here
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]), **cache_kwargs(model, cache))
    assert cache.get_seq_length() == 3
