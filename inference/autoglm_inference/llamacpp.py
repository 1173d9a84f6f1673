"""The llama.cpp runtime: GGUF weights decoded by llama.cpp's CPU kernels, batched like the torch one.

One llama.cpp context per loaded revision holds a KV cache for up to ``max_rows`` sequences
(``n_seq_max``, one unified cache); each row of a batch is one sequence id. Prefill decodes the
new rows' prompts in one ``llama_batch`` (chunks of ``n_batch`` tokens) asking for logits only at
each prompt's last token; a decode step feeds one token per row in one ``llama_batch``, so rows
decode together (continuous batching: rows join with their own sequence ids and leave by removing
their cache cells). The engine above owns the thread; nothing here is thread-safe.

Token ids come from the artifact's Hugging Face tokenizer, the same ids as the torch runtime sees;
llama.cpp's own tokenizer is never used. Greedy picks the arg-max of the logits llama.cpp returns;
temperature and nucleus sampling are ``sampling.sample_row``, as on the torch runtime, on these logits.

Low-level ``llama_cpp`` calls (``llama-cpp-python``, the optional ``llamacpp`` extra) rather than
its ``Llama`` class: that class decodes one sequence at a time, and batching is what a server needs.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import numpy as np

from autoglm_inference.sampling import Sampling, row_generator, sample_row
from autoglm_modeling.llamacpp import LlamaCppError, LlamaCppModel, default_threads

__all__ = ["LlamaCppBatch", "LlamaCppError", "LlamaCppRuntime", "default_threads"]

log = logging.getLogger(__name__)

#: The llama.cpp runtimes of this process that have rows decoding. Where two decode in turns (a canary
#: beside its stable, the overlap of a hot-swap; the server runs one step at a time), each lets its
#: thread pool sleep after every decode: a polling pool's workers would spin on the cores the other
#: computes on (about 85 ms after each graph).
_decoding: weakref.WeakSet[LlamaCppRuntime] = weakref.WeakSet()


class LlamaCppRuntime(LlamaCppModel):
    """The server's runtime over one GGUF model and its llama.cpp context (``LlamaCppModel``)."""

    name = "llama.cpp"

    # -- the runtime interface ------------------------------------------------------------------

    def prefill(self, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling]) -> LlamaCppBatch:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if len(prompts) > len(self._free):
            raise LlamaCppError(f"{len(prompts)} new rows, {len(self._free)} free sequence slots")
        for prompt in prompts:
            if len(prompt) >= self.context:
                raise ValueError(f"a prompt of {len(prompt)} tokens does not fit a context of {self.context}")
        seqs = [self._free.pop(0) for _ in prompts]
        batch = LlamaCppBatch(self, seqs, [len(p) for p in prompts], list(sampling))
        _decoding.add(self)
        try:
            batch.tokens = self._decode_prompts(prompts, batch)
        except BaseException:
            for seq in seqs:
                self._release_seq(seq)
            raise
        finally:
            self._yield_cores()
        return batch

    def idle(self) -> None:
        _decoding.discard(self)
        if self._pool is not None:
            self._pool.pause()

    def release(self) -> None:
        _decoding.discard(self)
        super().release()

    def _yield_cores(self) -> None:
        if self._pool is not None and len(_decoding) > 1:
            self._pool.pause()

    def _decode_prompts(self, prompts: Sequence[Sequence[int]], batch: LlamaCppBatch) -> list[int]:
        """Decode every prompt, all rows' tokens in order, ``n_batch`` tokens per ``llama_decode``, with
        logits only at each prompt's last token (a prompt that fits decodes in one call, as llama.cpp's
        own ``eval`` does); returns each row's first new token."""
        entries = [
            (row, seq, pos, token, pos == len(prompt) - 1)
            for row, (prompt, seq) in enumerate(zip(prompts, batch.seqs, strict=True))
            for pos, token in enumerate(prompt)
        ]
        first = [0] * len(prompts)
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start : start + self.n_batch]
            self._run([(seq, pos, token, last) for _, seq, pos, token, last in chunk])
            for index, (row, _, _, _, last) in enumerate(chunk):
                if last:  # read now: the next call overwrites this call's logits
                    first[row] = batch._pick(row, self._logits(index))
        return first


class LlamaCppBatch:
    """Rows decoding together in one llama.cpp context; ``tokens`` is each row's next input."""

    def __init__(
        self, runtime: LlamaCppRuntime, seqs: list[int], positions: list[int], sampling: list[Sampling]
    ) -> None:
        self.runtime = runtime
        self.seqs = seqs
        self.positions = positions  # the position of the token fed next, per row
        self.sampling = sampling
        self.generators = [row_generator(s) for s in sampling]
        self.tokens: list[int] = []
        self._greedy = all(s.temperature <= 0 for s in sampling)

    @property
    def size(self) -> int:
        return len(self.seqs)

    def next_tokens(self) -> list[int]:
        return list(self.tokens)

    def step(self) -> None:
        if max(self.positions) >= self.runtime.context:
            row = next(r for r, p in enumerate(self.positions) if p >= self.runtime.context)
            raise LlamaCppError(f"row {row} reached the context of {self.runtime.context} tokens")
        logits = self.runtime._run_step(self.seqs, self.positions, self.tokens)
        self.runtime._yield_cores()
        self.positions = [p + 1 for p in self.positions]
        if self._greedy:  # every row's arg-max in one call
            self.tokens = logits.argmax(axis=1).tolist()
        else:
            self.tokens = [self._pick(row, logits[row]) for row in range(self.size)]

    def keep(self, rows: Sequence[int]) -> None:
        kept = set(rows)
        for index, seq in enumerate(self.seqs):
            if index not in kept:
                self.runtime._release_seq(seq)
        self.seqs = [self.seqs[i] for i in rows]
        self.positions = [self.positions[i] for i in rows]
        self.tokens = [self.tokens[i] for i in rows]
        self.sampling = [self.sampling[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]
        self._greedy = all(s.temperature <= 0 for s in self.sampling)

    def merge(self, other: object) -> None:
        assert isinstance(other, LlamaCppBatch)
        assert other.runtime is self.runtime
        self.seqs += other.seqs
        self.positions += other.positions
        self.tokens += other.tokens
        self.sampling += other.sampling
        self.generators += other.generators
        self._greedy = self._greedy and other._greedy

    def _pick(self, row: int, logits: np.ndarray) -> int:
        sampling = self.sampling[row]
        if sampling.temperature <= 0:
            return int(logits.argmax())
        # The torch runtime's sampler too, on llama.cpp's logits: one rule, one seeded generator kind.
        return sample_row(logits, sampling, self.generators[row])
