"""AutoGLM's CPU kernel (``cpugemm``) against torch's fp32 product on the same dequantized weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from autoglm_modeling import cpugemm
from autoglm_modeling.quantization import (
    HalfWeightLinear,
    KernelSupport,
    kernel_support_as,
    quantize_int4_groupwise,
    quantize_int8_per_row,
    run_activations_in_fp32,
)
from tests.support.tiny_models import tiny_glm

needs_kernel = pytest.mark.skipif(
    not cpugemm.available(), reason=f"no AutoGLM CPU kernel: {cpugemm.why_unavailable()}"
)
#: An AVX2-class CPU: no VNNI, no native bf16, AutoGLM's kernel built.
AVX2 = KernelSupport(cpu_autoglm=True)


def _int4_dequantized(q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    n, k = q.shape
    scale = sz[..., 0].t().repeat_interleave(group, dim=1)
    zero = sz[..., 1].t().repeat_interleave(group, dim=1)
    return ((q.float() - 8) * scale + zero).view(n, k)


def _weights(n: int, k: int, group: int) -> dict[str, tuple[cpugemm.PackedWeight, torch.Tensor]]:
    """Each format packed, beside the fp32 weight it stands for (the oracle's input)."""
    w = torch.randn(n, k)
    q8, s8 = quantize_int8_per_row(w)
    q4, sz = quantize_int4_groupwise(w, group)
    return {
        "int8": (cpugemm.pack_int8(q8, s8), q8.float() * s8[:, None]),
        "int4": (cpugemm.pack_int4(q4, sz, group), _int4_dequantized(q4, sz, group)),
        "fp16": (cpugemm.pack_half(w.half()), w.half().float()),
        "bf16": (cpugemm.pack_half(w.bfloat16()), w.bfloat16().float()),
    }


@needs_kernel
@pytest.mark.parametrize(("n", "k", "group"), [(64, 128, 32), (40, 96, 32), (200, 320, 64), (8, 32, 32)])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 12, 13, 16, 45])
def test_every_format_equals_torch_on_the_dequantized_weight(n: int, k: int, group: int, rows: int) -> None:
    # Row counts on both sides of the six-row tile and of the buffered threshold; channel counts that
    # are not a multiple of the 16-wide panel.
    torch.manual_seed(n * 1000 + rows)
    x, bias = torch.randn(rows, k), torch.randn(n)
    for fmt, (packed, dense) in _weights(n, k, group).items():
        got = cpugemm.linear(x, packed, bias)
        want = F.linear(x, dense, bias)
        assert got.shape == (rows, n)
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 1e-5, f"{fmt}: relative error {err}"
        unbiased = cpugemm.linear(x, packed)
        assert float((unbiased - (want - bias)).abs().max() / want.abs().max()) < 1e-5, fmt


@needs_kernel
def test_the_result_does_not_depend_on_the_thread_count() -> None:
    torch.manual_seed(1)
    x = torch.randn(37, 256)
    for fmt, (packed, _) in _weights(96, 256, 64).items():
        one = cpugemm.linear(x, packed, threads=1)
        assert torch.equal(one, cpugemm.linear(x, packed, threads=2)), fmt
        assert torch.equal(one, cpugemm.linear(x, packed, threads=7)), fmt


@needs_kernel
def test_bad_shapes_are_refused_with_what_was_expected() -> None:
    packed, _ = _weights(16, 64, 32)["int8"]
    with pytest.raises(ValueError, match=r"x must be \[rows, 64\], got \[2, 63\]"):
        cpugemm.linear(torch.randn(2, 63), packed)
    with pytest.raises(ValueError, match="not a multiple of the group size 32"):
        cpugemm.pack_int4(torch.zeros(16, 48, dtype=torch.uint8), torch.zeros(1, 16, 2), 32)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        cpugemm.pack_half(torch.zeros(16, 32))
    assert cpugemm.linear(torch.zeros(0, 64), packed).shape == (0, 16)


def test_without_a_compiler_the_kernel_is_unavailable_and_torch_runs(tmp_path: Path) -> None:
    # A fresh process: the build is attempted once per process.
    code = (
        "import json, torch\n"
        "from autoglm_modeling import cpugemm\n"
        "from autoglm_modeling.quantization import Int8WeightOnlyLinear, kernel_support\n"
        "m = Int8WeightOnlyLinear.from_float(torch.randn(32, 64), None, torch.bfloat16)\n"
        "y = m(torch.randn(20, 64).bfloat16())\n"
        "print(json.dumps([cpugemm.available(), cpugemm.why_unavailable(), kernel_support().cpu_autoglm,"
        " list(y.shape)]))\n"
    )
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "AUTOGLM_KERNEL_DIR": str(tmp_path / "k")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    available, why, chosen, shape = json.loads(done.stdout.splitlines()[-1])
    assert not available
    assert not chosen
    assert "did not build" in why or "lacks" in why
    assert shape == [20, 32]


@needs_kernel
def test_a_build_lands_whole_in_the_kernel_folder(tmp_path: Path) -> None:
    compiler = cpugemm._compiler()
    assert compiler is not None
    target = tmp_path / "libtest.so"
    cpugemm._build(target, compiler)
    assert target.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["libtest.so"]  # no partial file left beside it


def _tie(model: torch.nn.Module) -> torch.nn.Module:
    model.get_output_embeddings().weight = model.get_input_embeddings().weight  # as SmolLM2's are
    return model


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_half_weights_run_in_fp32_keep_their_storage_and_ties(
    tmp_path: Path, dtype: torch.dtype, tie: bool
) -> None:
    from transformers import AutoModelForCausalLM

    folder = tiny_glm(tmp_path / "glm")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    if tie:
        model, reference = _tie(model), _tie(reference)
    keys = set(model.state_dict())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.tensor([[3, 14, 15, 92, 6, 5, 35, 8, 97, 9]])
    # The oracle: the same half weights, every op in fp32, in plain torch.
    with torch.no_grad():
        want = reference.float()(input_ids=ids).logits
    with kernel_support_as(AVX2):
        swapped = run_activations_in_fp32(model)
        with torch.no_grad():
            got = model(input_ids=ids).logits
    linears = [m for m in model.modules() if isinstance(m, HalfWeightLinear)]
    assert swapped == len(linears) > 0
    assert all(m.weight.dtype == dtype for m in linears)
    assert set(model.state_dict()) == keys
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_half_weights_are_left_alone_where_torch_is_fast(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_glm(tmp_path / "glm"), dtype=torch.bfloat16)
    with kernel_support_as(KernelSupport(cpu_bf16_gemm=True)):
        assert run_activations_in_fp32(model) == 0
    assert not any(isinstance(m, HalfWeightLinear) for m in model.modules())


@needs_kernel
@pytest.mark.parametrize("method", ["int8-weight-only", "int4-weight-only", "smoothquant-w8a8"])
def test_quantized_models_run_with_fp32_activations_on_the_stored_weights(
    tmp_path: Path, method: str
) -> None:
    import copy

    from transformers import AutoModelForCausalLM

    from autoglm_modeling.quantization import (
        Int4WeightOnlyLinear,
        Int8DynamicLinear,
        Int8WeightOnlyLinear,
        quantize_model,
    )
    from autoglm_pipelines.calibration import collect_input_absmax

    source = _tie(
        AutoModelForCausalLM.from_pretrained(tiny_glm(tmp_path / "glm"), dtype=torch.float32).eval()
    )
    ids = torch.tensor([[3, 14, 15, 92, 6, 5, 35, 8, 97, 9, 31, 41]])
    model = copy.deepcopy(source)
    absmax = collect_input_absmax(model, [ids[0]])[0] if method == "smoothquant-w8a8" else None
    quantize_model(model, method, group_size=32, activation_absmax=absmax)
    # The oracle: plain transformers in fp32 with each weight replaced by its dequantized value.
    oracle = copy.deepcopy(source)
    for name, module in model.named_modules():  # new Parameters: the quantized head is untied
        if isinstance(module, (Int8WeightOnlyLinear, Int4WeightOnlyLinear)):
            oracle.get_submodule(name).weight = torch.nn.Parameter(module.dequantized())
        elif isinstance(module, torch.nn.Embedding):  # kept in float (bf16)
            oracle.get_submodule(name).weight = torch.nn.Parameter(module.weight.detach().float())
    with kernel_support_as(AVX2):
        changed = run_activations_in_fp32(model)
        with torch.no_grad():
            got = model(input_ids=ids).logits
    assert (changed > 0) == (method != "smoothquant-w8a8")  # W8A8 runs fp32 activations already
    halves = [n for n, t in model.state_dict().items() if t.dtype in (torch.bfloat16, torch.float16)]
    assert halves in ([], ["model.embed_tokens.weight"])  # a gather: the table may stay bf16
    assert got.dtype == torch.float32
    if method == "smoothquant-w8a8":  # activations are quantized per token: compare with float loosely
        assert any(isinstance(m, Int8DynamicLinear) for m in model.modules())
        with torch.no_grad():
            want = source(input_ids=ids).logits
        assert float((got - want).norm() / want.norm()) < 0.05
        return
    with torch.no_grad():
        want = oracle(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("setting", "native_bf16"), [("off", False), ("auto", True), ("on", True), ("bogus", False)]
)
def test_the_kernel_setting_chooses_where_autoglm_kernel_runs(
    monkeypatch: pytest.MonkeyPatch, setting: str, native_bf16: bool
) -> None:
    from autoglm_modeling.quantization import _autoglm_kernel_chosen

    monkeypatch.setenv("AUTOGLM_CPU_KERNEL", setting)
    if setting == "bogus":
        with pytest.raises(ValueError, match="AUTOGLM_CPU_KERNEL='bogus': use one of auto, on, off"):
            _autoglm_kernel_chosen(native_bf16)
        return
    assert _autoglm_kernel_chosen(native_bf16) == (setting == "on" and cpugemm.available())


@needs_kernel
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_rows_are_quantized_as_int8_dynamic_quantizes_them_bit_for_bit(rows: int) -> None:
    torch.manual_seed(rows)
    x = torch.randn(rows, 96) * torch.logspace(-3, 2, 96)  # outlier channels, as SmoothQuant sees
    x[0, :] = 0.0  # an all-zero row: the scale floor
    x[-1, 5] = 0.5 * x[-1].abs().max() / 127 * 255  # lands exactly on half a step: ties round to even
    xq, scale = cpugemm.quantize_rows(x)
    want_scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
    assert torch.equal(scale, want_scale)
    assert torch.equal(xq, torch.round(x / want_scale).clamp(-127, 127))


@needs_kernel
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_the_packed_weight_follows_a_reload(kind: str) -> None:
    from autoglm_modeling.quantization import Int4WeightOnlyLinear, Int8WeightOnlyLinear

    def make(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        w = torch.randn(48, 64)
        if kind == "int8":
            return Int8WeightOnlyLinear.from_float(w, None, torch.float32)
        return Int4WeightOnlyLinear.from_float(w, None, torch.float32, 32)

    module, other = make(0), make(1)
    x = torch.randn(20, 64)
    with kernel_support_as(AVX2), torch.no_grad():
        first = module(x)
        module.load_state_dict(other.state_dict())  # in place: the packed copy must not go stale
        second = module(x)
    assert torch.allclose(first, F.linear(x, make(0).dequantized()), rtol=1e-5, atol=1e-4)
    assert torch.allclose(second, F.linear(x, other.dequantized()), rtol=1e-5, atol=1e-4)
