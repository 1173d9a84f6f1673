"""Quantized modules: numerics against float, the kernel path against the portable path, save and reload."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Glm4Config, Glm4ForCausalLM

from autoglm_modeling import cpugemm
from autoglm_modeling.folders import load_model_folder, save_model_folder
from autoglm_modeling.loading import load_causal_lm
from autoglm_modeling.quantization import (
    CPU_PACKED_MAX_ROWS,
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    KernelSupport,
    ModuleKind,
    dequantized_kinds,
    kernel_path,
    kernel_support_as,
    quantize_int4_groupwise,
    quantize_int8_per_row,
    quantize_model,
    weight_bytes,
)
from autoglm_modeling.smoothing import FOLDABLE_NORMS, smooth_model
from autoglm_pipelines.calibration import collect_input_absmax
from autoglm_pipelines.pruning import prune_2of4, prune_structured_l1
from tests.support.tiny_models import tiny_glm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_glm(tmp_path_factory.mktemp("tiny") / "glm")


def test_int8_per_row_round_trip_error_is_within_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    q, scale = quantize_int8_per_row(w)
    assert q.dtype == torch.int8
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


def test_int4_groupwise_uses_sixteen_levels_and_small_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    q, sz = quantize_int4_groupwise(w, 32)
    assert int(q.max()) <= 15
    scale = sz[..., 0].t().repeat_interleave(32, dim=1)
    zero = sz[..., 1].t().repeat_interleave(32, dim=1)
    assert ((q.float() - 8) * scale + zero - w).abs().max() <= scale.max()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_cpu_kernel_agrees_with_portable_dequantized_path(kind: str) -> None:
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), torch.randn(3, 5, 128)
    module = (
        Int8WeightOnlyLinear.from_float(w, None, torch.bfloat16)
        if kind == "int8"
        else Int4WeightOnlyLinear.from_float(w, None, torch.bfloat16, 32)
    )
    kernel = module(x.bfloat16()).float()  # bf16 on CPU: the fused ATen kernel
    portable = torch.nn.functional.linear(x, module.dequantized())
    assert kernel.shape == (3, 5, 64)
    assert torch.allclose(kernel, portable, rtol=0.05, atol=0.2)


# The tiny model is mostly its 512x64 table and head: the table stays bf16, so the ratios are far
# from a real model's (SmolLM2: int8 about 0.35, int4 about 0.27 of fp32).
@pytest.mark.parametrize(
    ("method", "max_bytes_ratio"), [("bf16", 0.51), ("int8-weight-only", 0.43), ("int4-weight-only", 0.35)]
)
def test_quantized_model_is_smaller_close_to_float_and_reloads_exactly(
    tiny: Path, tmp_path: Path, method: str, max_bytes_ratio: float
) -> None:
    lm = load_causal_lm(tiny, None, cache_dir=tmp_path)
    ids = lm.tokenizer("To be, or not to be, that is the question", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = lm.model(ids).logits.float()
    model = copy.deepcopy(lm.model)
    plan = quantize_model(model, method, group_size=32)
    with torch.no_grad():
        out = model(ids).logits.float()
    assert weight_bytes(model) <= max_bytes_ratio * weight_bytes(lm.model)
    assert torch.allclose(out, reference, atol=0.15), (out - reference).abs().max()
    # top-1 next-token predictions mostly agree with the float model
    assert (out.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.8

    save_model_folder(model, lm.tokenizer, tmp_path / "q", plan)
    fresh, _, reloaded = load_model_folder(tmp_path / "q")
    assert reloaded is not None
    assert reloaded.modules == plan.modules
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits.float(), out)


def test_a_tied_head_is_quantized_on_its_own_and_the_table_stays_float(tiny: Path, tmp_path: Path) -> None:
    """As compressed-tensors, transformers and vLLM expect: the embedding table is float (bf16), the
    head an int8 copy, and the model is saved untied (a quantized head cannot share a float table)."""
    model = load_causal_lm(tiny, None, cache_dir=tmp_path).model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    float_table = model.get_input_embeddings().weight.detach().clone()
    plan = quantize_model(model, "int8-weight-only")
    assert not plan.tied
    assert "model.embed_tokens" not in plan.modules
    assert plan.modules["lm_head"] == "int8-weight-only"
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert torch.equal(model.get_input_embeddings().weight, float_table.to(torch.bfloat16))
    assert model.config.tie_word_embeddings is False
    head = model.get_output_embeddings()
    assert torch.allclose(head.dequantized(), float_table, atol=float(head.weight_scale.max()) / 2 + 1e-6)


def test_skip_modules_keeps_them_in_float(tiny: Path, tmp_path: Path) -> None:
    lm = load_causal_lm(tiny, None, cache_dir=tmp_path)
    ids = lm.tokenizer("Something is rotten in the state of Denmark.", return_tensors="pt").input_ids
    model = copy.deepcopy(lm.model)
    plan = quantize_model(model, "int8-weight-only", skip_modules=["down_proj", "lm_head"])
    assert all("down_proj" not in name for name in plan.modules)
    assert "lm_head" in plan.skipped
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(down, torch.nn.Linear)
    # skipped modules and the norms keep the source model's dtype, not the kernels' bf16, and their
    # values: never rounded through bf16 on the way
    assert down.weight.dtype == torch.float32
    assert torch.equal(down.weight, lm.model.get_submodule("model.layers.0.mlp.down_proj").weight)
    norm = model.get_submodule("model.layers.0.input_layernorm").weight
    assert torch.equal(norm, lm.model.get_submodule("model.layers.0.input_layernorm").weight)
    assert model.get_output_embeddings().weight.dtype == torch.float32
    assert model.get_submodule("model.layers.0.input_layernorm").weight.dtype == torch.float32
    assert model.get_submodule("model.norm").weight.dtype == torch.float32
    with torch.no_grad():
        out = model(ids).logits
    assert out.dtype == torch.bfloat16  # the activations between modules stay in the compute dtype
    save_model_folder(model, lm.tokenizer, tmp_path / "q", plan)
    fresh, _, _ = load_model_folder(tmp_path / "q")
    assert fresh.get_submodule("model.layers.1.mlp.down_proj").weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, out)


def test_glm4_norms_are_folded_so_smoothquant_smooths_every_layer_group(tmp_path: Path) -> None:
    config = Glm4Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = Glm4ForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 48))
    absmax, _ = collect_input_absmax(model, ids)
    smoothed = copy.deepcopy(model)
    report = smooth_model(smoothed, absmax, alpha=0.5)
    for layer in (0, 1):
        assert report[f"model.layers.{layer}.self_attn.q_proj"] == "smoothed q/k/v"
        assert report[f"model.layers.{layer}.mlp.gate_up_proj"] == "smoothed gate/up"
        assert report[f"model.layers.{layer}.mlp.down_proj"] == "smoothed down (folded into up)"
    with torch.no_grad():
        assert torch.allclose(smoothed(ids).logits, model(ids).logits, atol=1e-4)


@pytest.mark.parametrize("name", sorted(FOLDABLE_NORMS))
def test_every_foldable_norm_scales_its_output_by_its_weight(name: str) -> None:
    cls = _transformers_class(name)
    if cls is None:
        pytest.skip(f"{name} is not in this transformers")
    norm = cls(16)
    x = torch.randn(3, 16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) + 0.5)
        before = norm(x)
        s = torch.rand(16) + 0.5
        norm.weight.div_(s)  # what smoothing does to a norm it folds into
        assert torch.allclose(norm(x) * s, before, atol=1e-5)


def _transformers_class(name: str) -> type[torch.nn.Module] | None:
    import importlib

    import transformers

    models = Path(transformers.__file__).parent / "models"
    for source in sorted(models.glob("*/modeling_*.py")):
        if f"class {name}(" in source.read_text(encoding="utf-8"):
            module = importlib.import_module(f"transformers.models.{source.parent.name}.{source.stem}")
            cls: type[torch.nn.Module] = getattr(module, name)
            return cls
    return None


def test_smoothquant_needs_activation_statistics(tiny: Path, tmp_path: Path) -> None:
    model = load_causal_lm(tiny, None, cache_dir=tmp_path).model
    with pytest.raises(ValueError, match="needs activation statistics"):
        quantize_model(model, "smoothquant-w8a8")


def test_smoothing_leaves_the_float_model_unchanged_and_flattens_activation_outliers(
    tiny: Path, tmp_path: Path
) -> None:
    lm = load_causal_lm(tiny, None, cache_dir=tmp_path)
    ids = lm.tokenizer(
        "Though this be madness, yet there is method in it. " * 6, return_tensors="pt"
    ).input_ids
    absmax, _ = collect_input_absmax(lm.model, ids)
    smoothed = copy.deepcopy(lm.model)
    report = smooth_model(smoothed, absmax, alpha=0.5)
    assert sum(v.startswith("smoothed") for v in report.values()) == 6  # GLM: q/k/v, fused gate/up, down
    with torch.no_grad():
        assert torch.allclose(smoothed(ids).logits, lm.model(ids).logits, atol=1e-4)
    after, _ = collect_input_absmax(smoothed, ids)
    key = "model.layers.0.mlp.down_proj"
    assert _spread(after[key]) < _spread(absmax[key])


def _spread(t: torch.Tensor) -> float:
    return float(t.max() / t.clamp(min=1e-6).median())


def test_int8_dynamic_module_matches_float_within_quantization_error() -> None:
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), torch.randn(3, 7, 128)
    module = Int8DynamicLinear.from_float(w, None, torch.float32)
    reference = torch.nn.functional.linear(x, w)
    out = module(x)
    assert out.shape == (3, 7, 64)
    assert float((out - reference).norm() / reference.norm()) < 0.02


def test_unknown_method_is_refused(tiny: Path, tmp_path: Path) -> None:
    model = load_causal_lm(tiny, None, cache_dir=tmp_path).model
    with pytest.raises(ValueError, match="not implemented yet"):
        quantize_model(model, "int2-weight-only")


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_structured_pruning_shrinks_matrices_keeps_the_model_loadable(
    tiny: Path, tmp_path: Path, sparsity: float
) -> None:
    lm = load_causal_lm(tiny, None, cache_dir=tmp_path)
    model = copy.deepcopy(lm.model)
    before = sum(p.numel() for p in model.parameters())
    report = prune_structured_l1(model, sparsity)
    assert report["intermediateSize"]["after"] == round(128 * (1 - sparsity))
    assert sum(p.numel() for p in model.parameters()) < before
    ids = lm.tokenizer("The rest is silence.", return_tensors="pt").input_ids
    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_structured_pruning_keeps_the_most_important_channels(tiny: Path, tmp_path: Path) -> None:
    model = load_causal_lm(tiny, None, cache_dir=tmp_path).model
    mlp = model.get_submodule("model.layers.0.mlp")
    with torch.no_grad():
        mlp.down_proj.weight[:, 7] *= 100  # channel 7 is now by far the most important
        marker = mlp.down_proj.weight[:, 7].clone()
    prune_structured_l1(model, 0.5)
    kept = model.get_submodule("model.layers.0.mlp.down_proj").weight
    assert any(torch.equal(kept[:, j], marker) for j in range(kept.shape[1]))


def test_two_of_four_masks_half_of_every_group_of_four(tiny: Path, tmp_path: Path) -> None:
    model = load_causal_lm(tiny, None, cache_dir=tmp_path).model
    prune_2of4(model)
    w = model.get_submodule("model.layers.1.self_attn.q_proj").weight.view(-1, 4)
    assert ((w == 0).sum(dim=1) >= 2).all()


def test_int4_default_group_size_fits_each_layer_and_an_explicit_one_is_honoured(
    tiny: Path, tmp_path: Path
) -> None:
    lm = load_causal_lm(tiny, None, cache_dir=tmp_path)  # hidden 64, intermediate 128
    default = copy.deepcopy(lm.model)
    plan = quantize_model(default, "int4-weight-only")
    assert plan.skipped == {}
    assert plan.group_sizes["model.layers.0.self_attn.q_proj"] == 64  # 128 does not divide 64 inputs
    assert plan.group_sizes["model.layers.0.mlp.down_proj"] == 128
    save_model_folder(default, lm.tokenizer, tmp_path / "q", plan)
    _, _, reloaded = load_model_folder(tmp_path / "q")
    assert reloaded is not None
    assert reloaded.group_sizes == plan.group_sizes
    explicit = quantize_model(copy.deepcopy(lm.model), "int4-weight-only", group_size=128)
    assert "does not fit group size 128" in explicit.skipped["model.layers.0.self_attn.q_proj"]


# Kernel choice. The machines differ (AVX2-only edge CPUs, AVX512-VNNI servers, GPUs): which kernel
# runs is decided by a pure function of the kind, the device, the row count and what torch offers.
VNNI = KernelSupport(cpu_int8_int8=True, cpu_bf16_gemm=True)
AVX2 = KernelSupport()  # no VNNI, no native bf16: _int_mm is a scalar loop there
OURS = KernelSupport(cpu_autoglm=True)  # the same, with AutoGLM's AVX2 kernel built
OURS_AVX512 = KernelSupport(cpu_autoglm=True, cpu_avx512=True)  # AVX-512 without bf16 (Skylake-SP)
needs_kernel = pytest.mark.skipif(not cpugemm.available(), reason="AutoGLM's CPU kernel did not build here")
CUDA = KernelSupport(cuda_int8_weight=True, cuda_int4_weight=True, cuda_int8_int8=True)


@pytest.mark.parametrize(
    ("kind", "device", "rows", "support", "path"),
    [
        ("int8-dynamic", "cpu", 1, VNNI, "int8-int8"),
        ("int8-dynamic", "cpu", 256, VNNI, "int8-int8"),
        ("int8-dynamic", "cpu", 1, AVX2, "packed"),
        ("int8-dynamic", "cpu", CPU_PACKED_MAX_ROWS, AVX2, "packed"),
        ("int8-dynamic", "cpu", CPU_PACKED_MAX_ROWS + 1, AVX2, "dequantized"),  # never the scalar loop
        ("int8-weight-only", "cpu", 1, VNNI, "packed"),
        ("int8-weight-only", "cpu", 256, VNNI, "dequantized"),
        ("int4-weight-only", "cpu", CPU_PACKED_MAX_ROWS, AVX2, "packed"),
        ("int4-weight-only", "cpu", 64, AVX2, "dequantized"),
        ("int8-weight-only", "cpu", 1, OURS, "autoglm"),
        ("int8-weight-only", "cpu", 256, OURS, "autoglm"),
        ("int4-weight-only", "cpu", 4096, OURS, "autoglm"),
        ("int8-dynamic", "cpu", 256, OURS, "autoglm"),
        ("int8-dynamic", "cpu", 256, KernelSupport(cpu_int8_int8=True, cpu_autoglm=True), "int8-int8"),
        ("int8-weight-only", "cpu", CPU_PACKED_MAX_ROWS, OURS_AVX512, "autoglm"),
        ("int8-weight-only", "cpu", CPU_PACKED_MAX_ROWS + 1, OURS_AVX512, "dequantized"),
        ("int8-weight-only", "cuda", 1, OURS, "dequantized"),
        ("int8-weight-only", "cuda", 1, CUDA, "packed"),
        ("int4-weight-only", "cuda", 512, CUDA, "packed"),
        ("int8-dynamic", "cuda", 1, CUDA, "int8-int8"),
        ("int8-weight-only", "cuda", 1, VNNI, "dequantized"),  # a torch without the CUDA kernels
        ("int8-dynamic", "mps", 1, CUDA, "dequantized"),
    ],
)
def test_kernel_path_for_each_device_and_row_count(
    kind: ModuleKind, device: str, rows: int, support: KernelSupport, path: str
) -> None:
    assert kernel_path(kind, device, rows, support) == path


def test_dequantized_kinds_name_what_runs_without_a_kernel() -> None:
    kinds: set[ModuleKind] = {"int8-weight-only", "int4-weight-only", "int8-dynamic"}
    assert dequantized_kinds(kinds, "cpu", AVX2) == []
    assert dequantized_kinds(kinds, "cuda", CUDA) == []
    assert dequantized_kinds(kinds, "cuda", KernelSupport(cuda_int8_int8=True)) == [
        "int4-weight-only",
        "int8-weight-only",
    ]
    assert dequantized_kinds(kinds, "mps", CUDA) == sorted(kinds)


def _aten_ops(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, set[str]]:
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[str] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        out = module(x)
    return out, seen


@pytest.mark.parametrize(
    "support",
    [VNNI, AVX2, pytest.param(OURS, marks=needs_kernel)],
    ids=["vnni", "avx2", "avx2-autoglm"],
)
@pytest.mark.parametrize("rows", [1, 16, 17, 256])
def test_int8_dynamic_is_faithful_on_every_path_and_never_crawls(support: KernelSupport, rows: int) -> None:
    torch.manual_seed(0)
    w, x = torch.randn(96, 128), torch.randn(rows, 128)
    module = Int8DynamicLinear.from_float(w, None, torch.float32)
    with kernel_support_as(support):
        out, ops = _aten_ops(module, x)
    # the same integers multiplied on every path: compare with per-token int8 done in fp32
    scale = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x / scale).clamp(-127, 127)
    reference = (xq @ module.weight_int8.float().t()) * scale * module.weight_scale
    assert torch.allclose(out, reference, rtol=4e-3, atol=1e-3)
    assert float((out - x @ w.t()).norm() / (x @ w.t()).norm()) < 0.02
    # without VNNI torch's _int_mm is a scalar loop (~3 ms per row): it must not be called there
    assert ("_int_mm" in ops) == (support is VNNI)


@pytest.mark.parametrize(
    "support",
    [VNNI, AVX2, pytest.param(OURS, marks=needs_kernel)],
    ids=["bf16-gemm", "no-bf16-gemm", "avx2-autoglm"],
)
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 16, 17, 256])
def test_weight_only_paths_agree_with_the_dequantized_weight(
    support: KernelSupport, kind: str, rows: int
) -> None:
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), torch.randn(rows, 128)
    module = (
        Int8WeightOnlyLinear.from_float(w, None, torch.bfloat16)
        if kind == "int8"
        else Int4WeightOnlyLinear.from_float(w, None, torch.bfloat16, 32)
    )
    with kernel_support_as(support):
        out, ops = _aten_ops(module, x.bfloat16())
    reference = torch.nn.functional.linear(x, module.dequantized())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, rtol=0.02, atol=0.1)
    packed = {"_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu"} & ops
    assert bool(packed) == (rows <= CPU_PACKED_MAX_ROWS and support is not OURS)
    if support is OURS:  # AutoGLM's kernel: no torch product at all
        assert not {"mm", "addmm", "linear", "_weight_int8pack_mm"} & ops


def test_the_plan_file_is_camel_case_and_reads_back_equal(tiny: Path, tmp_path: Path) -> None:
    import json

    from autoglm_modeling.folders import save_model_folder

    lm = load_causal_lm(tiny, None, cache_dir=tmp_path)
    plan = quantize_model(lm.model, "int4-weight-only", group_size=32)
    save_model_folder(lm.model, lm.tokenizer, tmp_path / "q", plan)
    on_disk = json.loads((tmp_path / "q" / "autoglm-quantization.json").read_text())
    assert {"method", "dtype", "groupSize", "modules", "skipped", "tiedEmbedding", "groupSizes"} <= set(
        on_disk
    )
    from autoglm_modeling.quantization import QuantizationPlan

    assert QuantizationPlan.from_json(on_disk) == plan


def test_a_corrupt_plan_file_is_a_one_line_error_naming_the_field(tiny: Path, tmp_path: Path) -> None:
    import json

    from autoglm_core.uris import SourceError
    from autoglm_modeling.folders import load_model_folder, save_model_folder

    lm = load_causal_lm(tiny, None, cache_dir=tmp_path)
    plan = quantize_model(lm.model, "int8-weight-only")
    save_model_folder(lm.model, lm.tokenizer, tmp_path / "q", plan)
    plan_file = tmp_path / "q" / "autoglm-quantization.json"
    plan_file.write_text(json.dumps({**plan.to_json(), "groupSize": "large"}))
    with pytest.raises(SourceError, match=r"not a valid quantization plan: groupSize: ") as caught:
        load_model_folder(tmp_path / "q")
    assert "\n" not in str(caught.value)


def test_int4_groups_of_one_sign_are_not_clipped() -> None:
    """With an integer zero point the range must hold 0.0: a group of only positive (or negative)
    weights is represented within half a step, not clipped at the top level."""
    from autoglm_modeling.quantization import quantize_int4_with_points

    w = torch.cat([torch.linspace(0.5, 0.6, 32), -torch.linspace(0.5, 0.6, 32), torch.linspace(-1, 1, 32)])
    q, scale, point = quantize_int4_with_points(w.view(1, -1).repeat(8, 1), 32)
    back = (q.float().view(8, 3, 32) - point.float()[..., None]) * scale[..., None]
    assert torch.all((back.view(8, -1) - w).abs() <= scale.repeat_interleave(32, dim=1) / 2 + 1e-6)
