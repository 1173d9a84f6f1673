"""Streaming detokenization: the text of a growing list of token ids, decoding only its end.

Three ways, the fastest the tokenizer allows:

- **byte pieces** (byte-level BPE: GPT-2, Llama 3, SmolLM2, GLM-4): each id's bytes are looked up
  in a table built once per tokenizer, and the bytes since the last whole character are decoded. It
  is what ``tokenizers``' ByteLevel decoder computes (a token whose characters are all in the
  byte alphabet is those bytes, any other is its own UTF-8; special tokens are skipped; invalid
  bytes become U+FFFD), and what llama.cpp's ``token_to_piece`` does. Measured in ``autoglm serve``
  streaming SmolLM2 while llama.cpp decoded on both cores: ``DecodeStream.step`` took 19 us of
  the event loop's CPU per token, its tables cold after every decode step.
- **DecodeStream**: ``tokenizers``' own incremental decoder for any other fast tokenizer (one Rust
  call per token, which keeps the piece before the new tokens and holds back half characters).
- **a window**: the tokens since the last complete piece and the piece before them, which
  SentencePiece needs to place spaces, for slow tokenizers.

Decoding the whole list for every token would cost time that grows with the answer, on the thread
that shares the cores with decode (as TGI and vLLM, only the end is decoded).

Where the tokenizer's ``decode`` cleans up tokenization spaces (transformers'
``clean_up_tokenization``: ``" ."`` to ``"."``, ``" n't"`` to ``"n't"``, ...; on for WordPiece and
SentencePiece tokenizers that ask for it, off for BPE ones unless forced), the streamed text is
cleaned the same way: the raw text is cleaned up to its last point that no replacement can straddle,
and a tail that could begin one (``" "``, ``" n"``, ``" '"``, ...) waits for the next token. Without
this the streamed text differed from the answer's whole decode, and the end of an answer whose
last tokens came with its end could be cut short.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import tokenizers
from tokenizers.decoders import DecodeStream

__all__ = ["Detokenizer", "byte_pieces", "cleans_up_spaces"]

log = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"

#: What transformers' ``clean_up_tokenization`` replaces, in its order (each by itself less its
#: leading space, and ``" ' "`` by ``"'"``).
_CLEANED = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")
_CLEANED_CHARS = frozenset("".join(_CLEANED))
#: How far before a cut a space may be and still begin a replacement that reaches past the cut:
#: no replacement reads more than three characters after a space without meeting another one
#: (``" n't"``, ``" 've"``; ``" n ' t"`` becomes ``" n't"`` once ``" ' "`` is replaced, then
#: ``"n't"``), so chaining back from space to space finds where none straddles.
_REACH = 3
_FORCE_BPE_CLEAN_UP = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"


def cleans_up_spaces(tokenizer: Any) -> bool:
    """Whether ``tokenizer.decode`` applies ``clean_up_tokenization`` by default, as transformers
    decides it: the tokenizer asks for it, and it is not a fast BPE tokenizer (skipped there unless
    ``clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output`` forces it)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    backend = getattr(tokenizer, "_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer) and type(backend.model).__name__ == "BPE":
        return bool(getattr(tokenizer, _FORCE_BPE_CLEAN_UP, False))
    return True


def _settled(raw: str, floor: int) -> int:
    """Where ``raw`` can be cut (at ``floor`` or after) so that no replacement straddles the cut,
    whatever text comes next: moved back before a space at most ``_REACH`` characters before it from
    which on every character is one the clean-up reads, as long as there is one. Text that ends in
    any other character (a letter outside ``n't've're``, a digit, a newline) is cut at its end."""
    cut = len(raw)
    while cut > floor and raw[cut - 1] in _CLEANED_CHARS:
        for start in range(max(floor, cut - _REACH), cut):
            if raw[start] == " " and _CLEANED_CHARS.issuperset(raw[start:cut]):
                cut = start
                break
        else:
            break
    return cut


def byte_pieces(tokenizer: Any) -> list[bytes] | None:
    """Each token id's bytes (``b""`` for special tokens), where ``tokenizer`` is a fast tokenizer
    whose decoder is byte-level alone; else ``None``. Built once and kept on the tokenizer: 85 ms
    for SmolLM2's 49152 tokens here, so a revision builds it as it loads, not on the event loop."""
    cached = tokenizer.__dict__.get("_autoglm_byte_pieces", False)
    if cached is not False:
        return cached  # type: ignore[no-any-return]
    backend = getattr(tokenizer, "_tokenizer", None)
    pieces = None
    if isinstance(backend, tokenizers.Tokenizer) and isinstance(
        backend.decoder, tokenizers.decoders.ByteLevel
    ):
        from transformers.convert_slow_tokenizer import bytes_to_unicode  # loaded with any fast tokenizer

        alphabet = {char: byte for byte, char in bytes_to_unicode().items()}  # type: ignore[no-untyped-call]
        vocab = backend.get_vocab(with_added_tokens=True)
        special = {i for i, added in backend.get_added_tokens_decoder().items() if added.special}
        pieces = [b""] * (max(vocab.values(), default=-1) + 1)
        for token, index in vocab.items():
            if index in special:
                continue
            if all(char in alphabet for char in token):
                pieces[index] = bytes(alphabet[char] for char in token)
            else:  # an added token written in plain text: the decoder keeps it as it is
                pieces[index] = token.encode()
    tokenizer.__dict__["_autoglm_byte_pieces"] = pieces
    return pieces


class Detokenizer:
    """``add(ids)`` with ``ids`` extending what was given before returns the text so far; a trailing
    half character (or the start of a space the tokenizer's clean-up may remove) is held back until
    the token that completes it. ``finish(ids)`` gives the whole text, what ``decode`` gives."""

    def __init__(self, tokenizer: Any, *, incremental: bool = True, pieces: bool = True) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self._prefix = 0  # the window starts here
        self._read = 0  # tokens up to here are in ``text``
        backend = getattr(tokenizer, "_tokenizer", None)
        self._backend = backend if isinstance(backend, tokenizers.Tokenizer) else None
        self._pieces = byte_pieces(tokenizer) if incremental and pieces else None
        self._pending = b""  # bytes of a character not complete yet
        use = incremental and self._pieces is None and self._backend is not None
        self._stream = DecodeStream(skip_special_tokens=True) if use else None
        self._cleans = cleans_up_spaces(tokenizer)
        # With ``_cleans``: the text before clean-up; ``text`` is it cleaned, up to ``_cleaned``.
        self._raw = ""
        self._cleaned = 0

    @property
    def mode(self) -> str:
        return "pieces" if self._pieces is not None else "stream" if self._stream is not None else "window"

    def add(self, ids: Sequence[int]) -> str:
        pieces = self._pieces
        if pieces is not None:
            pending = self._pending
            for token in ids[self._read :]:
                pending += pieces[token] if 0 <= token < len(pieces) else b""
            self._read = len(ids)
            if pending:
                text = pending.decode("utf-8", "replace")
                if text.endswith(_REPLACEMENT):
                    self._pending = pending
                else:
                    self._pending = b""
                    self._append(text)
            return self.text
        if self._stream is not None and self._backend is not None:
            for token in ids[self._read :]:
                piece = self._stream.step(self._backend, token)
                if piece:
                    self._append(piece)
            self._read = len(ids)
            return self.text
        before = self._decode(ids[self._prefix : self._read])
        window = self._decode(ids[self._prefix :])
        if len(window) > len(before) and not window.endswith(_REPLACEMENT):
            self._append(window[len(before) :])
            self._prefix, self._read = self._read, len(ids)
        return self.text

    def finish(self, ids: Sequence[int]) -> str:
        """The whole text of ``ids``, what ``decode`` gives (with what was held back: a half character
        decodes to U+FFFD there), streamed text first. Decodes the whole list once."""
        whole = self._decode(ids)
        raw = self._raw if self._cleans else self.text
        if not whole.startswith(raw):
            # Not seen with any tokenizer tested; the text already streamed stands, so the answer
            # a client assembles from its stream and the one it is told at the end agree.
            log.warning("the tokenizer's whole decode does not extend the text streamed; its end is dropped")
            whole = raw
        if self._cleans:
            self._raw = whole
            self.text += self.tokenizer.clean_up_tokenization(whole[self._cleaned :])
            self._cleaned = len(whole)
        else:
            self.text = whole
        self._read = len(ids)
        return self.text

    def _decode(self, ids: Sequence[int]) -> str:
        """``ids``' text before any clean-up of spaces."""
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def _append(self, piece: str) -> None:
        if not self._cleans:
            self.text += piece
            return
        raw = self._raw = self._raw + piece
        cut = _settled(raw, self._cleaned)
        if cut > self._cleaned:  # no replacement straddles ``cut``: the text before it is final
            self.text += self.tokenizer.clean_up_tokenization(raw[self._cleaned : cut])
            self._cleaned = cut
