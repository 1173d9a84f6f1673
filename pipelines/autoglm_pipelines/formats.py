"""Which format a variant is published in: safetensors for the torch engine, or GGUF for llama.cpp.

Pure: the caller says whether llama.cpp is installed and which architecture the source is.

A variant's engine (``autoglm_core.variants``) is ``torch``, ``llama.cpp`` or ``auto``. For
``llama.cpp`` and ``auto`` the compression's quantization method maps onto the GGUF kind llama.cpp's
own quantizer makes (``GGUF_KINDS``); pruning and distillation run first, in torch, on the float
model. What GGUF cannot express is named as the reason: a variant that asked for llama.cpp fails
with it, an ``auto`` one is published for torch and its model card says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from autoglm_modeling.gguf_export import QuantKind

#: The GGUF kind per quantization method. int8 methods all become Q8_0 (blocks of 32 weights, one
#: scale each; llama.cpp quantizes the activations to 8 bits per block for the product, so a W8A8
#: method is as close as GGUF comes); int4 becomes Q4_0 (blocks of 32: ``groupSize`` does not carry).
GGUF_KINDS: Final[dict[str, QuantKind]] = {
    "none": "F32",
    "fp16": "F16",
    "bf16": "BF16",
    "int8-weight-only": "Q8_0",
    "int8-dynamic": "Q8_0",
    "smoothquant-w8a8": "Q8_0",
    "int4-weight-only": "Q4_0",
}


@dataclass(frozen=True)
class FormatChoice:
    """``engine`` is what serves the published variant; ``kind`` its GGUF kind (None for torch);
    ``reason`` why an ``auto`` or ``llama.cpp`` variant cannot be GGUF (None when it is)."""

    engine: str
    kind: QuantKind | None = None
    reason: str | None = None


def choose_format(
    engine: str,
    quantization: dict[str, Any],
    *,
    architecture: str,
    writable: tuple[str, ...],
    llama_cpp: bool,
) -> FormatChoice:
    """The format of a variant built for ``engine`` with ``quantization`` (``spec.compression.
    quantization``'s JSON, after the search), from a source of ``architecture``; ``writable``: the
    architectures the GGUF writer knows; ``llama_cpp``: whether llama.cpp is installed here."""
    if engine == "torch":
        return FormatChoice("torch")
    method = str(quantization.get("method", "none"))
    reasons = []
    if not llama_cpp:
        reasons.append("llama.cpp is not installed here (make install-llamacpp)")
    if architecture not in writable:
        reasons.append(f"{architecture} cannot be written as GGUF yet (supported: {', '.join(writable)})")
    if quantization.get("algorithm", "rtn") != "rtn":
        reasons.append(
            f"llama.cpp's quantizer rounds to nearest; algorithm {quantization['algorithm']} has no GGUF form"
        )
    if quantization.get("skipModules") and method != "none":  # nothing is quantized to skip
        reasons.append("skipModules (modules kept in higher precision) have no GGUF form here")
    if method not in GGUF_KINDS:
        reasons.append(f"method {method} has no GGUF kind (known: {', '.join(GGUF_KINDS)})")
    if reasons:
        return FormatChoice("torch", reason="; ".join(reasons))
    return FormatChoice("llama.cpp", kind=GGUF_KINDS[method])
