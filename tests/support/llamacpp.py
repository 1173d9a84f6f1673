"""llama.cpp is an optional extra (`make install-llamacpp`): its tests skip, with the reason, where it
is not installed, except where ``AUTOGLM_REQUIRE_LLAMACPP=1`` (CI installs it) makes that a failure."""

from __future__ import annotations

import os

import pytest

from autoglm_modeling.gguf_export import llama_cpp_available

REQUIRED = os.environ.get("AUTOGLM_REQUIRE_LLAMACPP") == "1"
AVAILABLE = llama_cpp_available()
REASON = "llama-cpp-python is not installed (make install-llamacpp)"

needs_llama_cpp = pytest.mark.skipif(not AVAILABLE and not REQUIRED, reason=REASON)


def engines() -> list[object]:
    """The runtimes a test runs on: torch always, llama.cpp where installed (or required)."""
    return ["torch", pytest.param("llama.cpp", marks=needs_llama_cpp)]
