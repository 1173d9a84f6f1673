"""The llama.cpp runtime: GGUF weights decoded by llama.cpp's CPU kernels, batched like the torch one.

One llama.cpp context per loaded revision holds a KV cache for up to ``max_rows`` sequences
(``n_seq_max``, one unified cache); each row of a batch is one sequence id. Prefill decodes the
new rows' prompts in one ``llama_batch`` (chunks of ``n_batch`` tokens) asking for logits only at
each prompt's last token; a decode step feeds one token per row in one ``llama_batch``, so rows
decode together (continuous batching: rows join with their own sequence ids and leave by removing
their cache cells). The engine above owns the thread; nothing here is thread-safe.

Token ids come from the artifact's Hugging Face tokenizer, the same ids as the torch runtime sees;
llama.cpp's own tokenizer is never used. Greedy picks the arg-max of the logits llama.cpp returns;
temperature and nucleus sampling are the torch runtime's own (``sample_row``), on these logits.

Low-level ``llama_cpp`` calls (``llama-cpp-python``, the optional ``llamacpp`` extra) rather than
its ``Llama`` class: that class decodes one sequence at a time, and batching is what a server needs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from autoglm_core.card import ArtifactError
from autoglm_inference.generation import Sampling, row_generator, sample_row
from autoglm_modeling.gguf_export import require_llama_cpp

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")


class LlamaCppError(RuntimeError):
    """llama.cpp refused a load or a decode (the message names the call and its code)."""


class LlamaCppRuntime:
    """One GGUF model and its llama.cpp context (a KV cache for ``max_rows`` sequences)."""

    name = "llama.cpp"

    def __init__(
        self,
        path: Path,
        *,
        max_rows: int = 8,
        context: int = 4096,
        threads: int | None = None,
        n_batch: int = 512,
        extra_buffers: bool = True,
        kv_cells: int | None = None,
    ) -> None:
        self._llama = llama = require_llama_cpp("the llama.cpp engine")
        self.path = path
        self.threads = threads or default_threads()
        params = llama.llama_model_default_params()
        params.n_gpu_layers = 0
        # llama.cpp's default: weights repacked for this CPU's kernels where it has them (Q4_0 gains
        # the most). `make install-llamacpp` builds without AMX: on a Xeon with AMX, 0.3.36's AMX buffers
        # crashed every batched Q8_0/Q4_0/Q4_K decode (SIGSEGV from 8 tokens up).
        params.use_extra_bufts = extra_buffers
        self._model = llama.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:  # a truncated or corrupt file, an architecture this llama.cpp lacks
            raise ArtifactError(f"{path}: cannot load the model: llama.cpp could not load this GGUF file")
        trained = int(llama.llama_model_n_ctx_train(self._model))
        self.max_rows = max(1, max_rows)
        self.context = min(context, trained) if trained > 0 else context
        cparams = llama.llama_context_default_params()
        # One cache shared by all rows (unified): any row may use up to ``context`` cells, all rows
        # together ``kv_cells`` (default: rows x context, at most 8192 unless one row needs more).
        self.kv_cells = kv_cells or max(self.context, min(self.context * self.max_rows, 8192))
        cparams.n_ctx = self.kv_cells
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = self.max_rows
        cparams.kv_unified = True
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.no_perf = True
        self._ctx = llama.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama.llama_model_free(self._model)
            raise ArtifactError(
                f"{path}: llama.cpp could not create a context of {cparams.n_ctx} cells (memory?)"
            )
        self.n_batch = n_batch
        self._memory = llama.llama_get_memory(self._ctx)
        self.vocab_size = int(llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self._model)))
        self._batch = llama.llama_batch_init(max(n_batch, self.max_rows), 0, 1)
        self._free = list(range(self.max_rows))
        self._closed = False

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
        try:
            batch.tokens = self._decode_prompts(prompts, batch)
        except BaseException:
            for seq in seqs:
                self._release_seq(seq)
            raise
        return batch

    def negative_log_likelihood(self, ids: Sequence[int]) -> tuple[float, int]:
        """The summed negative log-likelihood of ``ids[1:]`` given what precedes each, and how many
        tokens that is: perplexity is ``exp(nll / count)``, measured on the engine that will serve."""
        if len(ids) < 2 or len(ids) > self.context:
            raise ValueError(f"score 2 to {self.context} tokens, got {len(ids)}")
        if not self._free:
            raise LlamaCppError("no free sequence slot to score on")
        seq = self._free.pop(0)
        total = 0.0
        try:
            for start in range(0, len(ids) - 1, self.n_batch):
                chunk = list(range(start, min(start + self.n_batch, len(ids) - 1)))
                self._run([(seq, pos, ids[pos], True) for pos in chunk])
                for index, pos in enumerate(chunk):
                    logits = self._logits(index).astype(np.float64)
                    top = logits.max()
                    total += float(top + np.log(np.exp(logits - top).sum()) - logits[ids[pos + 1]])
        finally:
            self._release_seq(seq)
        return total, len(ids) - 1

    def release(self) -> None:
        """Free the context and the weights (the engine's thread calls it once, at its end)."""
        if self._closed:
            return
        self._closed = True
        llama = self._llama
        llama.llama_batch_free(self._batch)
        llama.llama_free(self._ctx)
        llama.llama_model_free(self._model)

    # -- llama.cpp calls ------------------------------------------------------------------------

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

    def _run(self, tokens: Sequence[tuple[int, int, int, bool]]) -> None:
        batch = self._batch
        for i, (seq, pos, token, logits) in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(tokens)
        rc = self._llama.llama_decode(self._ctx, batch)
        if rc != 0:
            raise LlamaCppError(f"llama_decode returned {rc} for {len(tokens)} tokens (1: no KV cache space)")

    def _logits(self, index: int) -> np.ndarray:
        pointer = self._llama.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.vocab_size,))

    def _step(self, seqs: Sequence[int], positions: Sequence[int], tokens: Sequence[int]) -> None:
        self._run([(s, p, t, True) for s, p, t in zip(seqs, positions, tokens, strict=True)])

    def _release_seq(self, seq: int) -> None:
        self._llama.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._free.append(seq)


class LlamaCppBatch:
    """Rows decoding together in one llama.cpp context; ``tokens`` is each row's next input."""

    def __init__(
        self, runtime: LlamaCppRuntime, seqs: list[int], positions: list[int], sampling: list[Sampling]
    ) -> None:
        self.runtime = runtime
        self.seqs = seqs
        self.positions = positions  # the position of the token fed next, per row
        self.sampling = sampling
        self.generators = [row_generator(s, _CPU) for s in sampling]
        self.tokens: list[int] = []

    @property
    def size(self) -> int:
        return len(self.seqs)

    def next_tokens(self) -> list[int]:
        return list(self.tokens)

    def step(self) -> None:
        for row, position in enumerate(self.positions):
            if position >= self.runtime.context:
                raise LlamaCppError(f"row {row} reached the context of {self.runtime.context} tokens")
        self.runtime._step(self.seqs, self.positions, self.tokens)
        self.positions = [p + 1 for p in self.positions]
        self.tokens = [self._pick(row, self.runtime._logits(row)) for row in range(self.size)]

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

    def merge(self, other: object) -> None:
        assert isinstance(other, LlamaCppBatch)
        assert other.runtime is self.runtime
        self.seqs += other.seqs
        self.positions += other.positions
        self.tokens += other.tokens
        self.sampling += other.sampling
        self.generators += other.generators

    def _pick(self, row: int, logits: np.ndarray) -> int:
        sampling = self.sampling[row]
        if sampling.temperature <= 0:
            return int(logits.argmax())
        # The torch runtime's sampler on llama.cpp's logits: one rule, one seeded generator kind.
        return int(sample_row(torch.from_numpy(logits.astype(np.float32)), sampling, self.generators[row]))


def default_threads() -> int:
    """Threads for llama.cpp: the CPUs this process may use (its affinity, e.g. a container's)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)
