"""Build and install llama-cpp-python (the ``llamacpp`` extra) for this machine's CPU: ``make install-llamacpp``.

PyPI has llama-cpp-python only as source, so pip compiles llama.cpp (5 to 15 minutes on 2 cores). The
wheel is built once per (version, Python, CPU feature set) and kept in ``~/.cache/autoglm/wheels``;
a later install on a machine with the same CPU features reuses it.

Flags: no OpenMP (see ``COMMON``); the instruction sets this CPU reports (``/proc/cpuinfo``) are turned on one by one instead of
``-march=native``, so the cache key names them, and AMX is always off: on a Sapphire Rapids Xeon,
llama.cpp's AMX buffers (in 0.3.36) crashed every batched decode of Q8_0, Q4_0 and Q4_K weights.
On other architectures (ARM) llama.cpp's native detection is used.

``AUTOGLM_LLAMACPP_CPU_FLAGS`` (space-separated ``/proc/cpuinfo`` flags) builds for another x86 CPU
than this one, e.g. ``"avx avx2 fma f16c bmi2"`` for an AVX2-only edge CPU (its own wheel in the cache):
what ``bench/runtime.py`` measured AVX2 code with on an AVX-512 machine.

Usage: ``python tools/llamacpp_build.py llama-cpp-python==0.3.36 diskcache==5.6.3``
(the first requirement is built; the others are its pure-Python dependencies, installed as pinned).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

#: /proc/cpuinfo flag -> llama.cpp's CMake option.
X86_FEATURES = {
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "bmi2": "GGML_BMI2",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
    "avx_vnni": "GGML_AVX_VNNI",
}
#: Space-separated /proc/cpuinfo flags to build for instead of this CPU's (e.g. an AVX2-only edge CPU).
FLAGS_ENV = "AUTOGLM_LLAMACPP_CPU_FLAGS"
#: ggml's own thread pool, not OpenMP: torch loads its own libgomp.so.1, which ggml would share.
COMMON = [
    "-DGGML_OPENMP=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cmake_args() -> list[str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["-DGGML_NATIVE=ON", *COMMON]
    wanted = os.environ.get(FLAGS_ENV)
    flags = set(wanted.split()) if wanted else cpu_flags()
    if wanted and (unknown := flags - set(X86_FEATURES)):
        raise SystemExit(f"{FLAGS_ENV}: unknown flags {sorted(unknown)}; known: {sorted(X86_FEATURES)}")
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in X86_FEATURES.items()]
    args += ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    return args + COMMON


def main(requirement: str, *others: str) -> int:
    python = sys.executable
    args = cmake_args()
    key = hashlib.sha256(f"{requirement} {sys.version_info[:2]} {' '.join(args)}".encode()).hexdigest()[:16]
    wheels = Path(os.environ.get("AUTOGLM_WHEEL_CACHE", Path.home() / ".cache" / "autoglm" / "wheels")) / key
    built = sorted(wheels.glob("*.whl"))
    if not built:
        print(
            f"building {requirement} (CMAKE_ARGS: {' '.join(args)}); this takes minutes",
            flush=True,
        )
        start = time.monotonic()
        wheels.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "CMAKE_ARGS": " ".join(args),
            "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
        }
        subprocess.run(
            [python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir",
             "-w", str(wheels), requirement],
            check=True, env=env,
        )  # fmt: skip
        built = sorted(wheels.glob("*.whl"))
        print(f"built {built[0].name} in {time.monotonic() - start:.0f} s into {wheels}", flush=True)
    else:
        print(f"reusing {built[0]} (built with these CMAKE_ARGS)", flush=True)
    # --force-reinstall: a build for other flags has the same version, which pip would keep
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(built[0])], check=True
    )
    if others:
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", *others], check=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(*sys.argv[1:]))
