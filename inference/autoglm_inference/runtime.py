"""What the decode engine needs from a runtime: prefill rows, step them, drop and merge rows.

The engine (``engine.py``) owns the queue, continuous batching, streaming, energy and stopping; a
runtime owns the weights and the KV cache. Two runtimes implement this: ``TorchRuntime`` (any
transformers causal LM, CPU or GPU: the reference) and ``LlamaCppRuntime`` (GGUF on llama.cpp's
CPU kernels, ``llamacpp.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

from torch import nn

from autoglm_inference.generation import DecodeBatch
from autoglm_inference.sampling import Sampling

#: The runtimes ``autoglm serve --engine`` names.
EngineKind = Literal["torch", "llama.cpp"]


class Batch(Protocol):
    """Rows decoding together; each row's next token is known after ``prefill`` and every ``step``."""

    @property
    def size(self) -> int: ...

    def next_tokens(self) -> list[int]: ...

    def step(self) -> object: ...

    def keep(self, rows: Sequence[int]) -> None: ...

    def merge(self, other: Any) -> None: ...


class Runtime(Protocol):
    name: str

    def prefill(self, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling]) -> Batch: ...

    def idle(self) -> None:
        """No rows left and none waiting: the engine is about to wait for work."""

    def release(self) -> None: ...


class TorchRuntime:
    """A transformers model on its device, decoded with ``DecodeBatch``."""

    name = "torch"

    def __init__(self, model: nn.Module) -> None:
        self.model: nn.Module | None = model

    def prefill(self, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling]) -> DecodeBatch:
        assert self.model is not None, "the runtime was released"
        return DecodeBatch.prefill(self.model, prompts, sampling)

    def idle(self) -> None:
        pass

    def release(self) -> None:
        self.model = None
