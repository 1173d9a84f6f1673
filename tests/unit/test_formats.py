"""Which format a variant is published in: GGUF where llama.cpp can serve it, else torch's, with why."""

from __future__ import annotations

from typing import Any

import pytest

from autoglm_pipelines.formats import GGUF_KINDS, FormatChoice, choose_format

WRITABLE = ("LlamaForCausalLM", "GlmForCausalLM")


def choose(
    engine: str, *, llama_cpp: bool = True, architecture: str = "GlmForCausalLM", **q: Any
) -> FormatChoice:
    return choose_format(
        engine,
        {"method": "int8-weight-only", **q},
        architecture=architecture,
        writable=WRITABLE,
        llama_cpp=llama_cpp,
    )


@pytest.mark.parametrize("method", sorted(GGUF_KINDS))
def test_every_method_has_the_kind_llama_cpps_quantizer_makes(method: str) -> None:
    assert choose("auto", method=method) == FormatChoice("llama.cpp", kind=GGUF_KINDS[method])
    assert choose("llama.cpp", method=method).kind == GGUF_KINDS[method]


def test_torch_is_torch_whatever_else_holds() -> None:
    assert choose("torch") == FormatChoice("torch")
    assert choose("torch", llama_cpp=False, architecture="Other", algorithm="gptq") == FormatChoice("torch")


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"llama_cpp": False}, "llama.cpp is not installed here (make install-llamacpp)"),
        ({"architecture": "MistralForCausalLM"},
         "MistralForCausalLM cannot be written as GGUF yet (supported: LlamaForCausalLM, GlmForCausalLM)"),
        ({"method": "int4-weight-only", "algorithm": "gptq"},
         "llama.cpp's quantizer rounds to nearest; algorithm gptq has no GGUF form"),
        ({"skipModules": ["lm_head"]}, "skipModules (modules kept in higher precision) have no GGUF form here"),
    ],
)  # fmt: skip
def test_what_gguf_cannot_hold_is_named(changes: dict[str, Any], why: str) -> None:
    choice = choose("auto", **changes)
    assert (choice.engine, choice.kind, choice.reason) == ("torch", None, why)


def test_every_reason_is_named_at_once() -> None:
    choice = choose("llama.cpp", llama_cpp=False, architecture="Other", skipModules=["x"])
    assert choice.reason is not None
    assert choice.reason.count("; ") == 2


def test_skip_modules_of_an_unquantized_variant_are_no_obstacle() -> None:
    """An fp32 target inherits the spec's skipModules: nothing is quantized, nothing is skipped."""
    assert choose("auto", method="none", skipModules=["lm_head"]) == FormatChoice("llama.cpp", kind="F32")
