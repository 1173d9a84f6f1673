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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tokenizers
from tokenizers.decoders import DecodeStream

__all__ = ["Detokenizer", "byte_pieces"]

_REPLACEMENT = "\ufffd"


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
    half character is held back until the token that completes it."""

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
                    self.text += text
                    self._pending = b""
            return self.text
        if self._stream is not None and self._backend is not None:
            for token in ids[self._read :]:
                piece = self._stream.step(self._backend, token)
                if piece:
                    self.text += piece
            self._read = len(ids)
            return self.text
        decode = self.tokenizer.decode
        before = str(decode(ids[self._prefix : self._read], skip_special_tokens=True))
        window = str(decode(ids[self._prefix :], skip_special_tokens=True))
        if len(window) > len(before) and not window.endswith(_REPLACEMENT):
            self.text += window[len(before) :]
            self._prefix, self._read = self._read, len(ids)
        return self.text
