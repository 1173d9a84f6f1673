"""Weight quantization of causal LMs, with modules that run PyTorch's fused CPU kernels.

Written here rather than taken from torchao: on this project's CPUs (torch 2.13) torchao's int8
weight-only path ran about 150x slower than fp32 for a 576x1536 layer at batch 1, while ATen's own
fused dequantize-matmul kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``, both
with bf16 activations) ran 3.4x and 1.1x faster than fp32. The modules below store plain
quantized tensors (portable, safetensors) and pack them for the kernel when loaded; on devices
without the kernel they dequantize and use ``F.linear``.

Methods: ``fp16``/``bf16`` cast the weights; ``int8-weight-only`` stores per-output-channel
symmetric int8; ``int4-weight-only`` stores group-wise asymmetric 4-bit. In both the tied
embedding / lm_head table is quantized once to int8 (it is a fifth of a small model) and shared.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Self

import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import Field
from torch import nn

from autoglm_core.camel import CamelModel
from autoglm_modeling import cpugemm

log = logging.getLogger(__name__)
QUANTIZATION_FILE = "autoglm-quantization.json"
#: Not ``model.safetensors`` on purpose: plain ``from_pretrained`` must refuse a quantized folder
#: ("no model.safetensors") rather than load it as a float model with random weights.
#: Methods that only cast the weights: their folders are standard Hugging Face checkpoints.
CAST_METHODS = ("none", "fp16", "bf16")
ModuleKind = Literal["int8-weight-only", "int4-weight-only", "int8-dynamic", "int8-embedding"]
#: Methods that quantize activations per token as well as weights.
DYNAMIC_METHODS = ("int8-dynamic", "smoothquant-w8a8")
DEFAULT_INT4_GROUP_SIZE = 128
#: Group sizes tried, largest first, when the spec leaves int4's group size to us.
INT4_GROUP_SIZES = (128, 64, 32)


KernelPath = Literal["packed", "int8-int8", "autoglm", "dequantized"]
#: Most activation rows (tokens in one forward) for which the CPU's fused dequantize-matmul kernels
#: (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) are used. They are matrix-vector kernels:
#: 2x faster than fp32 at one row, as fast at 16, 2-3x slower at 256 (576x1536, this project's CPUs).
#: Above it the weight is dequantized once per forward into a dense GEMM, which is amortised over rows.
CPU_PACKED_MAX_ROWS = 16
#: torch's CUDA ``_int_mm`` needs more than 16 rows; fewer are padded with zero rows.
CUDA_INT_MM_MIN_ROWS = 17


@dataclass(frozen=True)
class KernelSupport:
    """Which of torch's quantized matmul kernels this process has; read once by ``kernel_support``.

    ``cpu_int8_int8``: ``torch._int_mm`` runs through oneDNN only on CPUs with AVX512-VNNI; elsewhere
    it is a scalar loop (about 3 ms per activation row of a 576x1536 layer on an AVX2 CPU, 100x fp32).
    ``cpu_bf16_gemm``: native bf16 matrix products (AVX512-BF16 or AMX); without them a bf16 GEMM is
    emulated and 10-18x slower than fp32, so dequantized CPU products then run in fp32.
    ``cpu_autoglm``: AutoGLM's own AVX2 product (``cpugemm``) is built and chosen: only on CPUs without
    native bf16, where torch has nothing as fast (on CPUs with it torch's kernels measured faster).
    ``cpu_avx512``: torch's dense GEMMs use AVX-512, twice the width of AutoGLM's AVX2 kernel, so for
    many rows the dequantized product is faster there.
    The ``cuda_*`` fields say whether torch has a CUDA kernel for each quantized product.
    """

    cpu_int8_int8: bool = False
    cpu_bf16_gemm: bool = False
    cpu_autoglm: bool = False
    cpu_avx512: bool = False
    cuda_int8_weight: bool = False
    cuda_int4_weight: bool = False
    cuda_int8_int8: bool = False


def kernel_support() -> KernelSupport:
    """What this machine's torch offers (cached: the answer does not change within a process)."""
    global _SUPPORT
    if _SUPPORT is None:
        cpu = torch.backends.cpu
        bf16 = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        bf16 = bf16 and cpu.get_cpu_capability() != "DEFAULT"
        _SUPPORT = KernelSupport(
            cpu_int8_int8=bool(
                torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
                and torch.backends.mkldnn.enabled
                and torch.cpu._is_vnni_supported()
            ),
            cpu_bf16_gemm=bf16,
            cpu_autoglm=_autoglm_kernel_chosen(bf16),
            cpu_avx512=cpu.get_cpu_capability().startswith("AVX512"),
            cuda_int8_weight=_has_kernel("_weight_int8pack_mm", "CUDA"),
            cuda_int4_weight=_has_kernel("_weight_int4pack_mm", "CUDA")
            and _has_kernel("_convert_weight_to_int4pack", "CUDA"),
            cuda_int8_int8=_has_kernel("_int_mm", "CUDA"),
        )
    return _SUPPORT


_SUPPORT: KernelSupport | None = None
#: ``AUTOGLM_CPU_KERNEL``: ``auto`` (default: AutoGLM's kernel on CPUs without native bf16), ``on``
#: (wherever it builds, e.g. to run an AVX2 CPU's choices on a newer one), ``off`` (torch's kernels).
CPU_KERNEL_SETTINGS = ("auto", "on", "off")


def _autoglm_kernel_chosen(native_bf16: bool) -> bool:
    setting = os.environ.get("AUTOGLM_CPU_KERNEL", "auto").strip().lower() or "auto"
    if setting not in CPU_KERNEL_SETTINGS:
        raise ValueError(f"AUTOGLM_CPU_KERNEL={setting!r}: use one of {', '.join(CPU_KERNEL_SETTINGS)}")
    if setting == "off" or (setting == "auto" and native_bf16):
        return False
    return cpugemm.available()


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", dispatch_key))


def kernel_path(kind: ModuleKind, device_type: str, rows: int, support: KernelSupport) -> KernelPath:
    """How a quantized linear of ``kind`` multiplies ``rows`` activation rows on ``device_type``.

    Pure: ``support`` is passed in. ``packed``: a fused dequantize-matmul kernel on the stored
    integers; ``int8-int8``: an integer GEMM on per-token int8 activations; ``autoglm``: AutoGLM's
    AVX2 kernel (``cpugemm``) on the stored weights, in fp32; ``dequantized``: the weight is
    dequantized for this forward and multiplied densely (the portable fallback, and on AVX-512 CPUs
    the faster choice for many rows).
    """
    if kind == "int8-embedding":
        raise ValueError("an embedding gathers rows: it has no matmul path")
    if device_type == "cpu":
        if kind == "int8-dynamic" and support.cpu_int8_int8:
            return "int8-int8"
        if autoglm_kernel_runs(rows, support):
            return "autoglm"
        return "packed" if rows <= CPU_PACKED_MAX_ROWS else "dequantized"
    if device_type == "cuda":
        available = {
            "int8-weight-only": support.cuda_int8_weight,
            "int4-weight-only": support.cuda_int4_weight,
            "int8-dynamic": support.cuda_int8_int8,
        }[kind]
        if available:
            return "int8-int8" if kind == "int8-dynamic" else "packed"
    return "dequantized"


def autoglm_kernel_runs(rows: int, support: KernelSupport) -> bool:
    """Whether a CPU product of ``rows`` rows runs on AutoGLM's kernel (pure): wherever it is chosen,
    except above ``CPU_PACKED_MAX_ROWS`` rows on AVX-512 CPUs, whose dense GEMMs are twice as wide."""
    return support.cpu_autoglm and (rows <= CPU_PACKED_MAX_ROWS or not support.cpu_avx512)


class _CpuPacked:
    """A weight in ``cpugemm``'s panels, packed on first use and again whenever ``key`` changes."""

    def __init__(self) -> None:
        self._key: tuple[int, ...] | None = None
        self._weight: cpugemm.PackedWeight | None = None

    def get(self, key: tuple[int, ...], pack: Callable[[], cpugemm.PackedWeight]) -> cpugemm.PackedWeight:
        if self._weight is None or self._key != key:
            self._key, self._weight = key, pack()
        return self._weight


def _versions(*tensors: torch.Tensor) -> tuple[int, ...]:
    """Changes when any of ``tensors`` is replaced or written in place (``load_state_dict`` copies)."""
    return tuple(v for t in tensors for v in (t.data_ptr(), t._version))


@contextmanager
def kernel_support_as(support: KernelSupport) -> Iterator[None]:
    """Choose kernels as if the machine offered ``support`` (tests; the benchmark's other-CPU rows)."""
    global _SUPPORT
    saved, _SUPPORT = _SUPPORT, support
    try:
        yield
    finally:
        _SUPPORT = saved


def quantized_kinds(model: nn.Module) -> set[ModuleKind]:
    """The kinds of quantized linear modules in ``model``."""
    kinds: set[ModuleKind] = set()
    for module in model.modules():
        if isinstance(module, Int8DynamicLinear):
            kinds.add("int8-dynamic")
        elif isinstance(module, Int8WeightOnlyLinear):
            kinds.add("int8-weight-only")
        elif isinstance(module, Int4WeightOnlyLinear):
            kinds.add("int4-weight-only")
    return kinds


def dequantized_kinds(
    kinds: set[ModuleKind], device: torch.device | str, support: KernelSupport | None = None
) -> list[ModuleKind]:
    """The kinds that run dequantized on ``device`` at any batch size, for want of a kernel there.

    Such a variant is smaller than bf16 there but slower: the server logs it at load. On CPUs every
    kind has a kernel.
    """
    device_type = torch.device(device).type
    support = support or kernel_support()
    return sorted(k for k in kinds if kernel_path(k, device_type, 1, support) == "dequantized")


#: What the model card says about how each device runs a quantized variant.
EXECUTION_NOTE: dict[str, str] = {
    "cpu": "fused int8/int4 kernels for up to 16 tokens per forward, one dense product on the weight "
    "dequantized per forward above that; int8-dynamic and smoothquant-w8a8 use int8 x int8 products on "
    "AVX512-VNNI CPUs; on CPUs without native bf16, AutoGLM's AVX2 kernel on the stored weights (fp32 "
    "activations), where a C compiler built it",
    "cuda": "torch._weight_int8pack_mm, torch._weight_int4pack_mm and torch._int_mm where the serving "
    "torch has them (the server logs at load any kind that has none); without one a kind runs "
    "dequantized: the whole weight is dequantized on every forward, smaller than bf16 but slower",
    "other": "dequantized on every forward: smaller than bf16 but slower",
}


def _dense_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of a dequantized product: the activations', except emulated bf16 on a CPU."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and not kernel_support().cpu_bf16_gemm:
        return torch.float32
    return x.dtype


class _Int8Linear(nn.Module):
    """int8 weights with one scale per output channel; subclasses differ in how they multiply."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        )
        self.compute_dtype = dtype
        self._cpu_packed = _CpuPacked()

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor

    def _cpu_weight(self) -> cpugemm.PackedWeight:
        return self._cpu_packed.get(
            _versions(self.weight_int8, self.weight_scale),
            lambda: cpugemm.pack_int8(self.weight_int8, self.weight_scale),
        )

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> Self:
        module = cls(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype)
        q, scale = quantize_int8_per_row(weight)
        module.weight_int8.copy_(q)
        module.weight_scale.copy_(scale)
        if bias is not None and module.bias is not None:
            module.bias.data.copy_(bias.detach().to(dtype))
        return module


class Int8WeightOnlyLinear(_Int8Linear):
    """``y = x @ (w_int8 * scale).T + b``: int8 weights per output channel, bf16 activations."""

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.to(torch.float32) * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        path = kernel_path("int8-weight-only", x2.device.type, x2.shape[0], kernel_support())
        if path == "autoglm":
            y = cpugemm.linear(x2, self._cpu_weight(), self.bias).to(x2.dtype)
            return y.reshape(*shape[:-1], self.out_features)
        if path == "packed" and x2.dtype in (torch.bfloat16, torch.float16, torch.float32):
            y = torch._weight_int8pack_mm(
                x2.contiguous(), self.weight_int8, _in_dtype(self, "weight_scale", x2.dtype)
            )
        else:
            dense = _dense_dtype(x2)
            if dense == torch.float16:  # integer sums can pass fp16's range: scale the weight first
                y = F.linear(x2, self.dequantized().to(dense))
            else:  # int8 values are exact in bf16; one scale per output column after the product
                y = F.linear(x2.to(dense), self.weight_int8.to(dense)) * _in_dtype(
                    self, "weight_scale", dense
                )
            y = y.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class Int8DynamicLinear(_Int8Linear):
    """int8 weights per output channel and int8 activations per token, quantized on the fly.

    The product of the integers is the same on every path, only the kernel differs (``kernel_path``):
    ``torch._int_mm`` (int8 x int8 -> int32) where it is fast (AVX512-VNNI CPUs, CUDA); elsewhere
    the int8 weight-only kernel for a few rows (integers up to 127 are exact in bf16) and an fp32
    GEMM on the dequantized weight for many. Activations and the result stay fp32 around it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        rows = x2.shape[0]
        path = kernel_path("int8-dynamic", x2.device.type, rows, kernel_support())
        if path == "autoglm":  # the rows quantized in one pass, the weight's scale applied in the kernel
            xq, scale = cpugemm.quantize_rows(x2)
            y = cpugemm.linear(xq, self._cpu_weight()) * scale
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        scale = x2.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
        xq = torch.round(x2 / scale).clamp(-127, 127)
        if path == "int8-int8":
            xq8 = xq.to(torch.int8)
            if x2.device.type == "cuda" and rows < CUDA_INT_MM_MIN_ROWS:
                xq8 = F.pad(xq8, (0, 0, 0, CUDA_INT_MM_MIN_ROWS - rows))
            acc = torch._int_mm(xq8, self.weight_int8.t())[:rows].float()
        elif path == "packed":
            ones = torch.ones(self.out_features, dtype=torch.bfloat16, device=x2.device)
            acc = torch._weight_int8pack_mm(xq.to(torch.bfloat16), self.weight_int8, ones).float()
        else:
            acc = F.linear(xq, self.weight_int8.float())
        y = acc * scale * self.weight_scale
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


#: Rounds a weight ``[out, in]`` to 4 bits per group: returns q ``[out, in]``, scale and zero point
#: ``[out, in / group]`` (see ``quantize_int4_with_points``).
Int4Solver = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class Int4WeightOnlyLinear(nn.Module):
    """Group-wise asymmetric 4-bit weights with integer zero points, as compressed-tensors stores
    them: ``w = (q - z) * scale`` per group of inputs, q and z in [0, 15].

    The kernels take ``(q - 8) * scale + zero`` (``scales_and_zeros``, derived once and cached).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        dtype: torch.dtype,
        group_size: int,
        scale_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        # Two 4-bit values per byte, low nibble first, in input order: portable, not a kernel layout.
        self.register_buffer("weight_int4", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=scale_dtype))
        self.register_buffer("weight_zero_point", torch.full((out_features, groups), 8, dtype=torch.uint8))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        )
        self.compute_dtype = dtype
        self._packed: torch.Tensor | None = None
        self._kernel_refused = False
        self._cpu_packed = _CpuPacked()
        self._derived: tuple[tuple[int, ...], torch.Tensor] | None = None

    weight_int4: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor

    @staticmethod
    def supports(in_features: int, out_features: int, group_size: int) -> bool:
        return in_features % group_size == 0 and in_features % 2 == 0 and out_features % 8 == 0

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        group_size: int,
        solver: Int4Solver | None = None,
    ) -> Int4WeightOnlyLinear:
        """Round ``weight`` to nearest, or with ``solver`` (e.g. GPTQ), which returns the same
        (q, scale, zero point) as ``quantize_int4_with_points``."""
        module = cls(
            weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, group_size=group_size
        )
        q, scale, point = (solver or quantize_int4_with_points)(weight, group_size)
        module.weight_int4.copy_(q[:, 0::2] | (q[:, 1::2] << 4))
        module.weight_scale.copy_(scale)  # bf16-exact by construction
        module.weight_zero_point.copy_(point)
        if bias is not None and module.bias is not None:
            module.bias.data.copy_(bias.detach().to(dtype))
        return module

    @property
    def scales_and_zeros(self) -> torch.Tensor:
        """``[groups, out, 2]`` fp32 (scale, (8 - z) * scale): the layout of torch's int4 CPU kernel."""
        stamp = _versions(self.weight_scale, self.weight_zero_point)
        if self._derived is None or self._derived[0] != stamp:
            scale = self.weight_scale.float()
            zero = (8 - self.weight_zero_point.float()) * scale
            self._derived = (stamp, torch.stack((scale.t(), zero.t()), dim=-1).contiguous())
        return self._derived[1]

    def _unpacked(self) -> torch.Tensor:
        low, high = self.weight_int4 & 0xF, self.weight_int4 >> 4
        return torch.stack((low, high), dim=-1).reshape(self.out_features, self.in_features)

    def dequantized(self) -> torch.Tensor:
        q = self._unpacked().to(torch.float32).view(self.out_features, -1, self.group_size)
        point = self.weight_zero_point.float().unsqueeze(-1)
        return ((q - point) * self.weight_scale.float().unsqueeze(-1)).reshape(
            self.out_features, self.in_features
        )

    def _dequantized_as(self, dtype: torch.dtype) -> torch.Tensor:
        # Fewer passes over the weight than ``dequantized``: it runs on every many-row forward.
        q = self._unpacked().to(dtype).view(self.out_features, -1, self.group_size)
        point = self.weight_zero_point.to(dtype).unsqueeze(-1)
        return ((q - point) * self.weight_scale.to(dtype).unsqueeze(-1)).view(
            self.out_features, self.in_features
        )

    def _kernel_weight(self, device: torch.device) -> torch.Tensor | None:
        """The weight packed for ``device``'s kernel (once, on first use); None where it cannot run."""
        if self._packed is not None and self._packed.device == device:
            return self._packed
        q = self._unpacked()
        if device.type == "cpu":
            self._packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            return self._packed
        if self._kernel_refused:
            return None
        # The CUDA kernel takes two 4-bit values per byte, the first in the high nibble, in tiles of
        # 16 inputs; no GPU in CI, so the first product is checked against the dequantized weight.
        tiles = next((t for t in (8, 4, 2) if self.in_features % (16 * t) == 0), None)
        try:
            if tiles is None or self.group_size not in (32, 64, 128, 256):
                raise ValueError(f"shape {self.out_features}x{self.in_features} g{self.group_size}")
            pairs = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)
            packed = torch._convert_weight_to_int4pack(pairs, tiles)
            probe = torch.linspace(-1, 1, self.in_features, device=device, dtype=torch.bfloat16)[None]
            got = self._int4_kernel(probe, packed).float()
            want = F.linear(probe.float(), self.dequantized().to(device))
            if not torch.allclose(got, want, rtol=0.05, atol=0.05 * float(want.abs().max())):
                raise ValueError("its result differs from the dequantized weight's")
        except (RuntimeError, ValueError) as exc:
            self._kernel_refused = True
            log.warning("int4 kernel refused on %s (%s): this module runs dequantized", device, exc)
            return None
        self._packed = packed
        return packed

    def _cpu_weight(self) -> cpugemm.PackedWeight:
        return self._cpu_packed.get(
            _versions(self.weight_int4, self.weight_scale, self.weight_zero_point),
            lambda: cpugemm.pack_int4(self._unpacked(), self.scales_and_zeros, self.group_size),
        )

    def _scales_and_zeros_as(self, dtype: torch.dtype) -> torch.Tensor:
        derived = self.scales_and_zeros
        if dtype == derived.dtype:
            return derived
        cached = self.__dict__.get("_sz_as")
        if cached is None or cached[0] is not derived or cached[1] != dtype:
            cached = (derived, dtype, derived.to(dtype))
            self.__dict__["_sz_as"] = cached
        return cached[2]

    def _int4_kernel(self, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        sz = self._scales_and_zeros_as(x.dtype).to(x.device).contiguous()
        if x.device.type == "cpu":
            return torch._weight_int4pack_mm_for_cpu(x.contiguous(), packed, self.group_size, sz)
        return torch._weight_int4pack_mm(x.contiguous(), packed, self.group_size, sz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        path = kernel_path("int4-weight-only", x2.device.type, x2.shape[0], kernel_support())
        packed = self._kernel_weight(x2.device) if path == "packed" and x2.dtype == torch.bfloat16 else None
        if path == "autoglm":
            y = cpugemm.linear(x2, self._cpu_weight(), self.bias).to(x2.dtype)
            return y.reshape(*shape[:-1], self.out_features)
        if packed is not None:
            y = self._int4_kernel(x2, packed)
        else:
            dense = _dense_dtype(x2)
            y = F.linear(x2.to(dense), self._dequantized_as(dense)).to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._packed = None  # the packed CPU weight follows the tensors' versions by itself
        super()._load_from_state_dict(*args, **kwargs)


class HalfWeightLinear(nn.Module):
    """A linear whose fp16 or bf16 weight is multiplied in fp32, where the CPU has no native half GEMM.

    It holds the very ``weight`` and ``bias`` parameters of the ``nn.Linear`` it replaces (a tied
    lm_head stays tied, and the state dict keeps its keys) and runs AutoGLM's CPU kernel on them,
    or, for many rows on AVX-512 CPUs, an fp32 product on the weight converted for that forward.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._cpu_packed = _CpuPacked()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type == "cpu" and autoglm_kernel_runs(x2.shape[0], kernel_support()):
            packed = self._cpu_packed.get(_versions(self.weight), lambda: cpugemm.pack_half(self.weight))
            y = cpugemm.linear(x2, packed, self.bias)
        else:
            bias = None if self.bias is None else self.bias.float()
            y = F.linear(x2.float(), self.weight.float(), bias)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def run_activations_in_fp32(model: nn.Module) -> int:
    """Run a half-precision or bf16-activation model with fp32 activations where the CPU lacks native
    half GEMMs; returns how many modules changed (0: nothing changed).

    Without AVX512-BF16/AMX, torch emulates half-precision products and every other half op (fp16
    and bf16 ``F.linear`` measured 3-5x slower than fp32 with torch's AVX2 kernels, and attention in
    bf16 slower too), so there the stored weights keep their dtype and everything else runs in fp32:
    fp16/bf16 linears become ``HalfWeightLinear`` (their very parameters, so ties and state-dict keys
    stay), quantized linears compute in fp32 on AutoGLM's kernel, norms and other small parameters
    become fp32, and a half embedding (whose table a tied lm_head shares) returns fp32. Nothing
    changes on CPUs where torch is fast or where AutoGLM's kernel did not build. Call it on a model
    that will run on the CPU; the validate step and ``autoglm serve`` on a CPU both do.
    """
    if not kernel_support().cpu_autoglm:
        return 0
    halves = (torch.float16, torch.bfloat16)
    changed = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module.weight.dtype in halves:
            _set_module(model, name, HalfWeightLinear(module))
            changed += 1
        elif (
            isinstance(module, (_Int8Linear, Int4WeightOnlyLinear, Int8Embedding))
            and module.compute_dtype in halves
        ):
            module.compute_dtype = torch.float32
            changed += 1
    if not changed:
        return 0
    for module in model.modules():
        _remove_kept_casts(module)  # the casts to bf16 around modules kept in float: all is fp32 now
        if isinstance(module, HalfWeightLinear):
            continue
        if isinstance(module, nn.Embedding):
            if module.weight.dtype in halves:
                module.register_forward_hook(_cast_output_to(torch.float32))
            continue
        for param in module.parameters(recurse=False):
            if param.dtype in halves:
                param.data = param.data.float()
        for key, buffer in module.named_buffers(recurse=False):
            if buffer.dtype in halves:
                module._buffers[key] = buffer.float()
    return changed


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one scale per row (shareable with a tied lm_head)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32))
        self.compute_dtype = dtype

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight_int8).to(self.compute_dtype)
        return rows * self.weight_scale[ids].unsqueeze(-1).to(self.compute_dtype)


def _in_dtype(module: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Buffer ``name`` of ``module`` in ``dtype``: converted once and kept until the buffer changes."""
    tensor: torch.Tensor = getattr(module, name)
    if tensor.dtype == dtype:
        return tensor
    cache: dict[tuple[str, torch.dtype], tuple[tuple[int, int, str], torch.Tensor]] = (
        module.__dict__.setdefault("_autoglm_converted", {})
    )
    stamp = (tensor._version, tensor.data_ptr(), str(tensor.device))
    hit = cache.get((name, dtype))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    converted = tensor.to(dtype)
    cache[(name, dtype)] = (stamp, converted)
    return converted


def _kernel_exact(scale: torch.Tensor) -> torch.Tensor:
    # The kernels take scales in the activation dtype (bf16): quantizing with the very scale they
    # will use avoids a systematic per-channel error of up to 0.4% (it cost 1% perplexity on SmolLM2).
    return scale.to(torch.bfloat16).to(torch.float32)


def quantize_int8_per_row(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``weight ~= q * scale[:, None]`` with q in [-127, 127]."""
    w = weight.detach().to(torch.float32)
    scale = _kernel_exact((w.abs().amax(dim=1) / 127.0).clamp(min=1e-12))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4_with_points(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group with an integer zero point, as GPTQ, AWQ and compressed-tensors
    store it: ``w ~= (q - z) * scale`` with q, z in [0, 15] (0.0 stays exactly 0.0).

    Returns q as uint8 ``[out, in]``, the scale ``[out, in / group]`` (fp32 holding bf16-exact
    values, so the kernels that take bf16 use this very scale) and z as uint8 ``[out, in / group]``.
    """
    w = weight.detach().to(torch.float32)
    out_features, in_features = w.shape
    groups = w.view(out_features, in_features // group_size, group_size)
    scale, point = int4_group_params(groups)
    q = torch.round(groups / scale[..., None] + point[..., None]).clamp(0, 15)
    return q.to(torch.uint8).view(out_features, in_features), scale, point


def int4_group_params(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of each group (the last dimension) of ``groups``.

    The range always holds 0.0 (as compressed-tensors and GPTQ take it), so the zero point is one of
    the 16 levels: a group of only positive weights would otherwise need z < 0 and be clipped. The
    scale is rounded to bf16 so the kernels that take bf16 use this very scale.
    """
    low = groups.amin(dim=-1).clamp(max=0)
    high = groups.amax(dim=-1).clamp(min=0)
    scale = _kernel_exact(((high - low) / 15.0).clamp(min=1e-12))
    point = torch.round(-low / scale).clamp(0, 15)
    return scale, point.to(torch.uint8)


def quantize_int4_groupwise(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_int4_with_points`` in the layout of PyTorch's int4 CPU kernel: q as uint8
    ``[out, in]`` and ``scales_and_zeros`` ``[in / group, out, 2]``, with ``w ~= (q - 8) * scale +
    zero`` and ``zero = (8 - z) * scale`` (exact in fp32)."""
    q, scale, point = quantize_int4_with_points(weight, group_size)
    zero = (8 - point.float()) * scale
    return q, torch.stack((scale.t(), zero.t()), dim=-1).contiguous()


class QuantizationPlan(CamelModel):
    """What ``quantize_model`` did: the method, the module kinds by name, and what was left in float.

    Saved beside the weights as ``autoglm-quantization.json`` (camelCase keys).
    """

    method: str
    dtype: str
    group_size: int | None = None
    modules: dict[str, ModuleKind] = Field(default_factory=dict)
    skipped: dict[str, str] = Field(default_factory=dict)
    tied: bool = Field(default=False, alias="tiedEmbedding")
    #: SmoothQuant: which layer groups had their activation outliers migrated into the weights.
    smoothing: dict[str, str] = Field(default_factory=dict)
    #: int4: the group size of each module (the default picks per layer).
    group_sizes: dict[str, int] = Field(default_factory=dict)
    #: int4: modules not rounded to nearest, and how (e.g. "gptq").
    rounding: dict[str, str] = Field(default_factory=dict)


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield name, module


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(
    model: nn.Module,
    method: str,
    *,
    skip_modules: list[str] | None = None,
    group_size: int | None = None,
    activation_absmax: dict[str, torch.Tensor] | None = None,
    smoothing_alpha: float = 0.5,
    int4_solvers: dict[str, Int4Solver] | None = None,
) -> QuantizationPlan:
    """Quantize ``model`` in place (a Hugging Face causal LM) and return the plan to save beside it.

    ``smoothquant-w8a8`` needs ``activation_absmax`` (see ``calibration.collect_input_absmax``,
    collected on the float model) to migrate activation outliers into the weights first.
    ``int4_solvers``: by module name, how to round that module's int4 weight instead of to nearest
    (GPTQ from the pipeline's calibration); the plan records which modules used one.
    """
    skip = list(skip_modules or [])
    smoothed: dict[str, str] = {}
    if method == "smoothquant-w8a8":
        if not activation_absmax:
            raise ValueError("smoothquant-w8a8 needs activation statistics from calibration data")
        from autoglm_modeling.smoothing import smooth_model

        smoothed = smooth_model(model, activation_absmax, alpha=smoothing_alpha)
    if method in ("none", "fp16", "bf16"):
        dtype = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[method]
        for param in model.parameters():  # buffers (rotary inv_freq) stay fp32, as from_pretrained makes them
            param.data = param.data.to(dtype)
        return QuantizationPlan(method=method, dtype=str(dtype).removeprefix("torch."))
    if method not in ("int8-weight-only", "int4-weight-only", *DYNAMIC_METHODS):
        raise ValueError(f"quantization method {method!r} is not implemented yet")
    dynamic = method in DYNAMIC_METHODS
    # Weight-only kernels take bf16 activations; the int8 x int8 path runs fp32 around _int_mm.
    compute = torch.float32 if dynamic else torch.bfloat16
    gs = group_size or DEFAULT_INT4_GROUP_SIZE
    plan = QuantizationPlan(
        method=method,
        dtype=str(compute).removeprefix("torch."),
        group_size=gs if method.startswith("int4") else None,
        smoothing=smoothed,
    )
    embed = _input_embedding(model)
    head = _output_head(model)
    tied = embed is not None and head is not None and head[1].weight is embed[1].weight
    head_skipped = head is not None and _skipped(head[0], skip)
    if tied and head is not None and not head_skipped:
        # A quantized head cannot be tied to a float table: it gets its own int8 copy (the output
        # projection runs at every decoded token), and the model is saved untied.
        head[1].weight = nn.Parameter(head[1].weight.detach().to(torch.float32).clone(), requires_grad=False)
        config = getattr(model, "config", None)
        if config is not None:
            config.tie_word_embeddings = False
            text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
            text_config.tie_word_embeddings = False
    if embed is not None and not _skipped(embed[0], skip) and not (tied and head_skipped):
        # The table stays in float, as compressed-tensors, transformers and vLLM expect: bf16 (a
        # gather, no product), its rows cast to the compute dtype on the way out.
        own = embed[1].weight.dtype
        embed[1].to(torch.bfloat16 if own == torch.float32 else own)
    for name, linear in list(_linears(model)):
        if _skipped(name, skip):
            plan.skipped[name] = "in skipModules"
            continue
        if method == "int4-weight-only" and name != (head[0] if head else None):
            # An explicit group size is honoured exactly; the default takes the largest that fits.
            sizes = [gs] if group_size is not None else [s for s in INT4_GROUP_SIZES if s <= gs]
            fit = next(
                (
                    s
                    for s in sizes
                    if Int4WeightOnlyLinear.supports(linear.in_features, linear.out_features, s)
                ),
                None,
            )
            if fit is None:
                plan.skipped[name] = (
                    f"shape {linear.out_features}x{linear.in_features} does not fit group size {gs}"
                )
                continue
            solver = (int4_solvers or {}).get(name)
            _set_module(
                model, name, Int4WeightOnlyLinear.from_float(linear.weight, linear.bias, compute, fit, solver)
            )
            plan.modules[name] = "int4-weight-only"
            plan.group_sizes[name] = fit
            if solver is not None:
                plan.rounding[name] = getattr(solver, "name", "solver")
        elif dynamic:
            _set_module(model, name, Int8DynamicLinear.from_float(linear.weight, linear.bias, compute))
            plan.modules[name] = "int8-dynamic"
        else:
            _set_module(model, name, Int8WeightOnlyLinear.from_float(linear.weight, linear.bias, compute))
            plan.modules[name] = "int8-weight-only"
    _to_compute_dtype(model, compute, _float_kept(model, plan))
    return plan


def _float_kept(model: nn.Module, plan: QuantizationPlan) -> list[str]:
    """Modules that keep their source dtype: those left unquantized, the norms, a float embedding."""
    names = list(plan.skipped)
    embed = _input_embedding(model)
    if embed is not None and embed[0] not in plan.modules:
        names.append(embed[0])
    names += [
        name
        for name, module in model.named_modules()
        if type(module).__name__.endswith(("RMSNorm", "LayerNorm")) or isinstance(module, nn.LayerNorm)
    ]
    return names


def _to_compute_dtype(model: nn.Module, compute: torch.dtype, keep: list[str]) -> None:
    """Cast ``model`` to ``compute`` except the ``keep`` modules, which run in their own dtype.

    A kept module casts its floating inputs to its weights' dtype and its output to ``compute``, so
    the activations between modules stay in ``compute`` (what the quantized kernels take).
    """
    dtypes = {name: _own_float_dtype(model.get_submodule(name)) for name in keep}
    kept = {
        id(m)
        for name, dtype in dtypes.items()
        if dtype not in (None, compute)
        for m in model.get_submodule(name).modules()
    }
    _cast_floats(model, compute, skip=kept)  # kept modules are never rounded through the compute dtype
    for name, dtype in dtypes.items():
        if dtype is None or dtype == compute:
            continue
        module = model.get_submodule(name)
        # Removed by run_activations_in_fp32 (found by their type, so a deep copy's are too).
        module.register_forward_pre_hook(_cast_inputs_to(dtype, kept=True))
        module.register_forward_hook(_cast_output_to(compute, kept=True))


def _cast_floats(model: nn.Module, dtype: torch.dtype, *, skip: Collection[int] = ()) -> None:
    """``model.to(dtype)`` for parameters only. Buffers stay as they are: the rotary ``inv_freq`` fp32,
    as ``from_pretrained(dtype=...)`` leaves it (bf16 frequencies moved logits by about 1% on a tiny
    GLM), and the quantized modules' scales and zeros fp32, exactly as stored (a kernel that takes
    them in bf16 gets a cached copy, ``_in_dtype``)."""
    for module in model.modules():
        if id(module) in skip:
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)


def _own_float_dtype(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


class _Cast:
    """A dtype cast hook; a class rather than a closure so that the casts ``_to_compute_dtype`` put
    around modules kept in float (``kept``) can be found and removed, in a deep copy too."""

    def __init__(self, dtype: torch.dtype, *, kept: bool = False) -> None:
        self.dtype, self.kept = dtype, kept

    def _to(self, value: Any) -> Any:
        return (
            value.to(self.dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        )


class _CastInputs(_Cast):
    def __call__(self, _module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(self._to(a) for a in args)


class _CastOutput(_Cast):
    def __call__(self, _module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        return self._to(output)


def _cast_inputs_to(dtype: torch.dtype, *, kept: bool = False) -> _CastInputs:
    return _CastInputs(dtype, kept=kept)


def _cast_output_to(dtype: torch.dtype, *, kept: bool = False) -> _CastOutput:
    return _CastOutput(dtype, kept=kept)


def _remove_kept_casts(module: nn.Module) -> None:
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, hook in hooks.items() if isinstance(hook, _Cast) and hook.kept]:
            del hooks[key]


def _input_embedding(model: nn.Module) -> tuple[str, nn.Embedding] | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Embedding):
        return None
    return next(((n, m) for n, m in model.named_modules() if m is emb), None)


def _output_head(model: nn.Module) -> tuple[str, nn.Linear] | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        return None
    return next(((n, m) for n, m in model.named_modules() if m is head), None)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the saved weights: parameters and persistent buffers, a shared tensor counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in model.state_dict(keep_vars=True).values():
        key = (tensor.data_ptr(), tensor.nbytes)
        if key not in seen:
            seen.add(key)
            total += tensor.nbytes
    return total
