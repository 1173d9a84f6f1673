"""Models loaded in two threads at once come out whole (transformers' loader is not thread-safe)."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from autoglm_modeling.folders import load_model_folder
from autoglm_modeling.loading import load_causal_lm
from tests.support.tiny_models import tiny_glm


def _whole(model: torch.nn.Module) -> bool:
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return tied and not any(p.device.type == "meta" for p in model.parameters())


def test_concurrent_loads_tie_every_model_and_leave_no_meta_weights(tmp_path: Path) -> None:
    # from_pretrained swaps PreTrainedModel.tie_weights for a no-op on the class while it loads: a
    # model loaded by another thread meanwhile kept an untied lm_head on the meta device (every one
    # of 80 loads in two threads, before the lock).
    folder = tiny_glm(tmp_path / "glm")
    results: list[bool] = []

    def load() -> None:
        for i in range(8):
            model = (
                load_causal_lm(folder, None, cache_dir=tmp_path).model
                if i % 2
                else load_model_folder(folder)[0]
            )
            results.append(_whole(model))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 16
    assert all(results), f"{results.count(False)} of {len(results)} loads were not whole"
