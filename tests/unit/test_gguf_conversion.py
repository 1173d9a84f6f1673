"""GGUF files are converted once to a safetensors folder, also when two converters race for it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

import autoglm_modeling.loading as loading
from autoglm_modeling.loading import gguf_as_safetensors, load_causal_lm
from tests.support.tiny_models import tiny_gguf


def test_two_concurrent_conversions_each_write_their_own_folder(tmp_path: Path) -> None:
    gguf_file = tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    both_read = threading.Barrier(2, timeout=60)

    class TogetherTokenizer:
        """Both converters have read the GGUF (and found no conversion) before either writes."""

        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            tokenizer = AutoTokenizer.from_pretrained(*args, **kwargs)
            both_read.wait()
            return tokenizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loading, "AutoTokenizer", TogetherTokenizer)
        with ThreadPoolExecutor(2) as pool:
            folders = list(pool.map(lambda _: gguf_as_safetensors(gguf_file, cache_dir=cache), range(2)))

    assert folders[0] == folders[1]
    folder = folders[0]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind
    assert {"config.json", "model.safetensors", "tokenizer.json", "autoglm-conversion.json"} <= {
        p.name for p in folder.iterdir()
    }
    lm = load_causal_lm(gguf_file, "gguf", cache_dir=cache)  # the cached conversion is complete
    assert lm.folder == folder
    assert lm.tokenizer("To be, or not to be")["input_ids"]


def test_a_converted_file_is_not_converted_again(tmp_path: Path) -> None:
    gguf_file = tiny_gguf(tmp_path / "tiny.gguf")
    folder = gguf_as_safetensors(gguf_file, cache_dir=tmp_path)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert gguf_as_safetensors(gguf_file, cache_dir=tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
