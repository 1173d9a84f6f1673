"""A GGUF model in a llama.cpp context: what the server's llama.cpp runtime decodes with, and what the
pipeline's validate step measures a GGUF variant on (perplexity and batch-1 greedy decode), so the
gates are measured on the engine that will serve.

One context holds a KV cache for up to ``max_rows`` sequences (``n_seq_max``, one unified cache).
``_run`` feeds ``(sequence, position, token, wants_logits)`` entries to one ``llama_decode``;
``_logits(i)`` reads the logits of the ``i``-th entry that asked for them. Nothing here is
thread-safe: one thread owns a context.

Low-level ``llama_cpp`` calls (``llama-cpp-python``, the optional ``llamacpp`` extra) rather than
its ``Llama`` class: that class decodes one sequence at a time, and batching is what a server needs.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoglm_core.card import ArtifactError
from autoglm_modeling.ggml_threads import DEFAULT_POLL, attach_threadpool
from autoglm_modeling.gguf_export import require_llama_cpp


class LlamaCppError(RuntimeError):
    """llama.cpp refused a load or a decode (the message names the call and its code)."""


class LlamaCppModel:
    """One GGUF model and its llama.cpp context (a KV cache for ``max_rows`` sequences)."""

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
        poll: int | None = DEFAULT_POLL,
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
        # A persistent thread pool (as llama-server attaches), unless ``poll`` is None: then every
        # decode starts and joins its own threads, llama-cpp-python's default.
        self._pool = None if poll is None else attach_threadpool(llama, self._ctx, self.threads, poll=poll)
        self.n_batch = n_batch
        self._memory = llama.llama_get_memory(self._ctx)
        self.vocab_size = int(llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self._model)))
        capacity = max(n_batch, self.max_rows)
        self._batch = llama.llama_batch_init(capacity, 0, 1)
        # numpy views of the batch's arrays, so a step fills them with a slice assignment, not one
        # ctypes call per field and row (the step loop's Python runs with cold caches after a decode)
        self._tokens_in = np.ctypeslib.as_array(self._batch.token, shape=(capacity,))
        self._positions_in = np.ctypeslib.as_array(self._batch.pos, shape=(capacity,))
        self._wants_logits = np.ctypeslib.as_array(self._batch.logits, shape=(capacity,))
        np.ctypeslib.as_array(self._batch.n_seq_id, shape=(capacity,))[:] = 1  # one sequence per token
        self._seq_ids = [self._batch.seq_id[i] for i in range(capacity)]
        # ``llama_get_logits`` as a bare address (llama-cpp-python's binding returns a ctypes pointer,
        # which costs a cast per call), and the views made of it, by address and rows
        self._get_logits = llama.llama_cpp._lib["llama_get_logits"]  # a new function object, ours
        self._get_logits.restype = ctypes.c_void_p
        self._get_logits.argtypes = [ctypes.c_void_p]
        self._views: dict[tuple[int, int], np.ndarray] = {}
        self._free = list(range(self.max_rows))
        self._closed = False

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    # -- measurements ---------------------------------------------------------------------------

    def negative_log_likelihood(self, ids: Sequence[int]) -> tuple[float, int]:
        """The summed negative log-likelihood of ``ids[1:]`` given what precedes each, and how many
        tokens that is: perplexity is ``exp(nll / count)``, measured on the engine that will serve."""
        if len(ids) < 2 or len(ids) - 1 > self.context:  # the last token is scored, never decoded
            raise ValueError(f"score 2 to {self.context + 1} tokens, got {len(ids)}")
        seq = self._take_seq("score")
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

    def greedy(self, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], float, list[float]]:
        """Greedy decode at batch 1: the new tokens, the prefill's seconds and each later step's
        seconds (what validate times, as ``decode_benchmark`` does for torch)."""
        if not prompt or len(prompt) + new_tokens > self.context:
            raise ValueError(f"a prompt of 1 to {self.context - new_tokens} tokens, got {len(prompt)}")
        seq = self._take_seq("decode")
        try:
            start = time.perf_counter()
            entries = [(seq, pos, token, pos == len(prompt) - 1) for pos, token in enumerate(prompt)]
            for at in range(0, len(entries), self.n_batch):
                chunk = entries[at : at + self.n_batch]
                self._run(chunk)
            tokens = [int(self._logits(len(chunk) - 1).argmax())]
            prefill = time.perf_counter() - start
            steps = []
            for pos in range(len(prompt), len(prompt) + new_tokens - 1):
                start = time.perf_counter()
                tokens.append(int(self._run_step([seq], [pos], [tokens[-1]])[0].argmax()))
                steps.append(time.perf_counter() - start)
        finally:
            self._release_seq(seq)
        return tokens, prefill, steps

    def release(self) -> None:
        """Free the context and the weights (the owning thread calls it once, at its end)."""
        if self._closed:
            return
        self._closed = True
        llama = self._llama
        llama.llama_batch_free(self._batch)
        if self._pool is not None:
            self._pool.detach()
        llama.llama_free(self._ctx)
        llama.llama_model_free(self._model)

    # -- llama.cpp calls ------------------------------------------------------------------------

    def _run(self, tokens: Sequence[tuple[int, int, int, bool]]) -> None:
        batch = self._batch
        for i, (seq, pos, token, logits) in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(tokens)
        self._decode(len(tokens))

    def _run_step(self, seqs: Sequence[int], positions: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One decode step: token ``tokens[i]`` at ``positions[i]`` of sequence ``seqs[i]``, logits
        for every row; returns them, ``(rows, vocab)`` (valid until the next decode)."""
        rows = len(seqs)
        self._tokens_in[:rows] = tokens
        self._positions_in[:rows] = positions
        self._wants_logits[:rows] = 1
        seq_ids = self._seq_ids
        for i, seq in enumerate(seqs):
            seq_ids[i][0] = seq
        self._batch.n_tokens = rows
        self._decode(rows)
        return self._rows_logits(rows)

    def _decode(self, count: int) -> None:
        rc = self._llama.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise LlamaCppError(f"llama_decode returned {rc} for {count} tokens (1: no KV cache space)")

    def _rows_logits(self, rows: int) -> np.ndarray:
        """The logits of the last decode's ``rows`` outputs, in batch order: every row asked for them."""
        address = self._get_logits(self._ctx)
        if not address:
            raise LlamaCppError("llama_get_logits returned no logits")
        view = self._views.get((address, rows))
        if view is None:
            if len(self._views) > 64:  # addresses of buffers llama.cpp has since replaced
                self._views.clear()
            floats = (ctypes.c_float * (rows * self.vocab_size)).from_address(address)
            view = self._views[address, rows] = np.ctypeslib.as_array(floats).reshape(rows, -1)
        return view

    def _logits(self, index: int) -> np.ndarray:
        pointer = self._llama.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.vocab_size,))

    def _take_seq(self, what: str) -> int:
        if not self._free:
            raise LlamaCppError(f"no free sequence slot to {what} on")
        return self._free.pop(0)

    def _release_seq(self, seq: int) -> None:
        self._llama.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._free.append(seq)


def default_threads() -> int:
    """Threads for llama.cpp: the CPUs this process may use (its affinity, e.g. a container's)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)
