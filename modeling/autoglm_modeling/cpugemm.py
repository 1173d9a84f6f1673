"""AutoGLM's own CPU product for int8, 4-bit, fp16 and bf16 weights (``csrc/gemm.c``), through ctypes.

Why by hand: on x86 CPUs without AVX512-VNNI or AVX512-BF16 (AVX2 only: most edge CPUs), torch
2.13 has no product on such weights that keeps up with its own fp32 GEMM once more than a few rows
go through a layer (measured on a 576x1536 layer with torch's AVX2 kernels: ``_weight_int8pack_mm``
0.70x fp32 at 16 rows and 0.43x at 256, dequantize-then-sgemm 0.59x and 0.92x, fp16 and bf16
``F.linear`` 0.19-0.35x; ``torch._int_mm`` is a scalar loop there; oneDNN's AVX2 int8 saturates
int16 and fbgemm quantizes activations per tensor). The kernel converts the stored weights to fp32
in registers or, for many rows, once per block into cache, and multiplies in fp32: the same result
as the dequantized product up to the order of the sums.

The C source is compiled on first use with the system's C compiler into a per-user cache
(``$AUTOGLM_KERNEL_DIR``, else ``$XDG_CACHE_HOME/autoglm/kernels``), named by the hash of source and
flags, and written atomically, so concurrent processes share one build. Without a compiler, or on
a CPU without AVX2/FMA/F16C, ``available()`` is False and callers keep torch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from autoglm_core.paths import kernel_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "gemm.c"
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11")
ABI_VERSION = 2
#: Panel width: the packed layouts group output channels by this many.
PANEL = 16
#: From this many rows on, the kernel converts each block of panels once into a buffer and reuses it
#: for every row (measured: in-register conversion is faster up to about two tiles of six rows).
BUFFERED_ROWS = 13
REQUIRED_FLAGS = ("avx2", "fma", "f16c")

Format = Literal["int8", "int4", "fp16", "bf16"]
_FORMAT_CODES: dict[str, int] = {"int8": 1, "int4": 2, "fp16": 3, "bf16": 4}

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_why_not = ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 Linux ``/proc/cpuinfo``); empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(target: Path, compiler: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *CFLAGS, str(SOURCE), "-o", partial], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(partial, target)  # atomic: a concurrent build of the same source is identical
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, built on first use; None (and ``why_unavailable``) where it cannot be."""
    global _library, _tried, _why_not
    if _tried:  # every product asks: no lock once decided
        return _library
    with _lock:
        if _tried:
            return _library
        missing = [f for f in REQUIRED_FLAGS if f not in cpu_flags()]
        compiler = _compiler()
        if missing:
            _why_not = f"the CPU lacks {', '.join(missing)}"
        elif compiler is None:
            _why_not = "no C compiler (cc, gcc or clang) on PATH"
        else:
            digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
            target = kernel_dir() / f"libautoglm_gemm-{digest}.so"
            try:
                if not target.is_file():
                    _build(target, compiler)
                lib = ctypes.CDLL(str(target))
                if lib.agm_abi_version() != ABI_VERSION:
                    raise OSError(f"{target}: ABI {lib.agm_abi_version()}, expected {ABI_VERSION}")
                lib.agm_linear.restype = ctypes.c_int
                lib.agm_linear.argtypes = [
                    ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                    ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int,
                ]  # fmt: skip
                lib.agm_quantize_rows.restype = None
                lib.agm_quantize_rows.argtypes = [
                    ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                    ctypes.c_void_p, ctypes.c_int,
                ]  # fmt: skip
                _library = lib
            except (OSError, subprocess.SubprocessError) as exc:
                _why_not = f"the kernel did not build or load: {exc}"
        if _library is None:
            log.warning("AutoGLM's CPU kernels are not available (%s): torch's kernels are used", _why_not)
        _tried = True  # last: the lock-free check above must not see a decision half made
        return _library


def available() -> bool:
    return library() is not None


def why_unavailable() -> str:
    library()
    return _why_not


@dataclass(frozen=True)
class PackedWeight:
    """A weight in the kernel's panel layout, with what its format needs beside it."""

    fmt: Format
    out_features: int
    in_features: int
    panels: torch.Tensor
    #: int8: one scale per (padded) channel; int4: ``[panels, groups, 16]`` scales.
    scale: torch.Tensor | None = None
    #: int4: ``[panels, groups, 16]`` shifts, ``zero - 8 * scale``.
    shift: torch.Tensor | None = None
    group_size: int = 0


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    extra = (-t.shape[0]) % rows
    return torch.cat([t, t.new_zeros(extra, *t.shape[1:])]) if extra else t


def _panels(t: torch.Tensor) -> torch.Tensor:
    """``[N, K, ...]`` -> ``[ceil(N/16), K, 16, ...]``: 16 channels side by side for every input."""
    t = _padded(t, PANEL)
    return t.view(-1, PANEL, *t.shape[1:]).transpose(1, 2).contiguous()


def pack_int8(q: torch.Tensor, scale: torch.Tensor) -> PackedWeight:
    """Symmetric int8 ``[N, K]`` with one fp32 scale per output channel."""
    n, k = q.shape
    return PackedWeight(
        "int8", n, k, _panels(q.to(torch.int8)), scale=_padded(scale.float().contiguous(), PANEL)
    )


def pack_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> PackedWeight:
    """4-bit values ``q`` (0..15) ``[N, K]`` with ``w = (q - 8) * scale + zero`` per group.

    ``scales_and_zeros`` is ``[K / group, N, 2]``, the layout ``quantize_int4_groupwise`` returns.
    """
    n, k = q.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    panels = _panels(q.to(torch.uint8))  # [P, K, 16]
    packed = (panels[..., :8] | (panels[..., 8:] << 4)).contiguous()  # byte j: channel j, j + 8
    scale = scales_and_zeros[..., 0].float().t().contiguous()  # [N, G]
    zero = scales_and_zeros[..., 1].float().t().contiguous()
    return PackedWeight(
        "int4",
        n,
        k,
        packed,
        scale=_panels(scale),  # [P, G, 16]
        shift=_panels(zero - 8 * scale),
        group_size=group_size,
    )


def pack_half(weight: torch.Tensor) -> PackedWeight:
    """An fp16 or bf16 weight ``[N, K]``, kept in its own dtype."""
    if weight.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"pack_half takes fp16 or bf16 weights, not {weight.dtype}")
    n, k = weight.shape
    fmt: Format = "fp16" if weight.dtype == torch.float16 else "bf16"
    return PackedWeight(fmt, n, k, _panels(weight.detach()))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear(
    x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None, *, threads: int | None = None
) -> torch.Tensor:
    """``x @ W.T + bias`` in fp32 for ``x`` of shape ``[rows, in_features]`` on the CPU."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"AutoGLM's CPU kernels are not available: {_why_not}")
    if x.dim() != 2 or x.shape[1] != weight.in_features:
        raise ValueError(f"x must be [rows, {weight.in_features}], got {list(x.shape)}")
    x = x.float().contiguous()
    rows = x.shape[0]
    y = torch.empty(rows, weight.out_features, dtype=torch.float32)
    if rows == 0:
        return y
    b = None if bias is None else bias.float().contiguous()
    status = lib.agm_linear(
        _FORMAT_CODES[weight.fmt],
        rows,
        weight.out_features,
        weight.in_features,
        weight.group_size,
        x.data_ptr(),
        weight.in_features,
        weight.panels.data_ptr(),
        _ptr(weight.scale),
        _ptr(weight.shift),
        _ptr(b),
        y.data_ptr(),
        weight.out_features,
        threads or torch.get_num_threads(),
        BUFFERED_ROWS,
    )
    if status != 0:
        raise MemoryError("AutoGLM's CPU kernel could not allocate its conversion buffer")
    return y


def quantize_rows(x: torch.Tensor, *, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of fp32 ``x`` ``[rows, K]``, in one pass: the integers (as fp32) and
    the ``[rows, 1]`` scales, equal to ``Int8DynamicLinear``'s torch expression bit for bit."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"AutoGLM's CPU kernels are not available: {_why_not}")
    x = x.float().contiguous()
    rows, k = x.shape
    xq = torch.empty(rows, k, dtype=torch.float32)
    scale = torch.empty(rows, 1, dtype=torch.float32)
    if rows:
        lib.agm_quantize_rows(
            rows, k, x.data_ptr(), k, xq.data_ptr(), scale.data_ptr(), threads or torch.get_num_threads()
        )
    return xq, scale
