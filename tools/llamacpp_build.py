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

``--server`` (``make install-llama-server``) builds llama.cpp's own HTTP server, ``llama-server``, from
the llama.cpp that the same llama-cpp-python release vendors, with the same flags, and puts it beside
the venv's Python: ``bench/runtime.py``'s anchor as a client sees llama.cpp (streamed over HTTP too).
Cached in ``~/.cache/autoglm/llama-server`` by the same key. Only the benchmark uses it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
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


#: What ``--server`` changes: the server and its tools on, no TLS (it serves loopback), one static binary.
SERVER = ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF",
          "-DCMAKE_BUILD_TYPE=Release"]  # fmt: skip


def server_cmake_args() -> list[str]:
    """The wheel's options (same instruction sets, no OpenMP, no AMX) with the server built."""
    return [a for a in cmake_args() if not a.startswith("-DLLAMA_BUILD_SERVER=")] + SERVER


def cache_root() -> Path:
    wheels = os.environ.get("AUTOGLM_WHEEL_CACHE")
    return Path(wheels).parent if wheels else Path.home() / ".cache" / "autoglm"


def main(requirement: str, *others: str) -> int:
    if requirement == "--server":
        return build_server(others[0])
    python = sys.executable
    args = cmake_args()
    key = hashlib.sha256(f"{requirement} {sys.version_info[:2]} {' '.join(args)}".encode()).hexdigest()[:16]
    wheels = Path(os.environ.get("AUTOGLM_WHEEL_CACHE", cache_root() / "wheels")) / key
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


def build_server(requirement: str) -> int:
    """``llama-server`` from the llama.cpp that ``requirement``'s source release vendors, with the same
    flags as the wheel; installed beside this Python (the venv's ``bin``)."""
    args = server_cmake_args()
    key = hashlib.sha256(f"{requirement} {' '.join(args)}".encode()).hexdigest()[:16]
    binary = cache_root() / "llama-server" / key / "llama-server"
    if not binary.is_file():
        print(f"building llama-server from {requirement}'s llama.cpp ({' '.join(args)}); this takes minutes",
              flush=True)  # fmt: skip
        start = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                 "-d", str(work), requirement],
                check=True,
            )  # fmt: skip
            (sdist,) = work.glob("*.tar.gz")
            with tarfile.open(sdist) as archive:
                members = [m for m in archive.getmembers() if "/vendor/llama.cpp/" in m.name]
                archive.extractall(work, members=members, filter="data")
            (source,) = work.glob("*/vendor/llama.cpp")
            build = work / "build"
            jobs = str(os.cpu_count() or 2)
            subprocess.run(["cmake", "-S", str(source), "-B", str(build), *args], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
            subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
            binary.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(build / "bin" / "llama-server", binary)
        print(f"built llama-server in {time.monotonic() - start:.0f} s into {binary.parent}", flush=True)
    else:
        print(f"reusing {binary} (built with these flags)", flush=True)
    target = Path(sys.executable).parent / "llama-server"
    shutil.copy2(binary, target)
    print(f"installed {target}", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(*sys.argv[1:]))
