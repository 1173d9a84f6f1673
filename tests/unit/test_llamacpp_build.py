"""tools/llamacpp_build.py: the CMake options it builds llama.cpp with, for this CPU or for another."""

from __future__ import annotations

import platform

import pytest

from tools import llamacpp_build

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 options only")


def _options(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args if a.startswith("-D"))


def test_an_avx2_build_turns_every_avx512_option_off_and_amx_always(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGLM_LLAMACPP_CPU_FLAGS", "avx avx2 fma f16c bmi2")
    options = _options(llamacpp_build.cmake_args())
    assert options["GGML_NATIVE"] == "OFF"
    assert {options[o] for o in ("GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2")} == {"ON"}
    assert {options[o] for o in ("GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX_VNNI")} == {
        "OFF"
    }
    assert {options[o] for o in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")} == {"OFF"}
    assert options["GGML_OPENMP"] == "OFF"


def test_without_the_variable_it_builds_for_this_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOGLM_LLAMACPP_CPU_FLAGS", raising=False)
    options = _options(llamacpp_build.cmake_args())
    here = llamacpp_build.cpu_flags()
    for flag, option in llamacpp_build.X86_FEATURES.items():
        assert options[option] == ("ON" if flag in here else "OFF")


def test_a_misspelt_flag_is_refused_naming_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGLM_LLAMACPP_CPU_FLAGS", "avx2 avx-512")
    with pytest.raises(SystemExit, match=r"unknown flags \['avx-512'\].*avx512f"):
        llamacpp_build.cmake_args()


def test_llama_server_is_built_with_the_wheels_instruction_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's llama-server anchor runs the same kernels as the wheel our engine loads."""
    monkeypatch.setenv("AUTOGLM_LLAMACPP_CPU_FLAGS", "avx avx2 fma f16c bmi2")
    wheel, server = _options(llamacpp_build.cmake_args()), _options(llamacpp_build.server_cmake_args())
    assert wheel["LLAMA_BUILD_SERVER"] == "OFF"
    assert server["LLAMA_BUILD_SERVER"] == "ON"
    assert server["BUILD_SHARED_LIBS"] == "OFF"  # one binary, nothing to find at run time
    assert {k: v for k, v in server.items() if k.startswith("GGML_")} == {
        k: v for k, v in wheel.items() if k.startswith("GGML_")
    }
