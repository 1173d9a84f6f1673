"""GPTQ: the same 4-bit format as round-to-nearest, with each column's error compensated."""

from __future__ import annotations

import torch

from autoglm_modeling.quantization import quantize_int4_with_points
from autoglm_pipelines.calibration import collect_statistics
from autoglm_pipelines.gptq import gptq_int4


def dequantize(q: torch.Tensor, scale: torch.Tensor, point: torch.Tensor, group: int) -> torch.Tensor:
    out, width = q.shape
    codes = q.float().view(out, width // group, group)
    return ((codes - point.float()[..., None]) * scale[..., None]).view(out, width)


def correlated_inputs(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs like a layer's activations: mostly a few directions (rank 16) plus a little noise, some
    channels ten times louder. One fixed distribution; ``seed`` draws different rows from it."""
    mixing = torch.randn(16, width, generator=torch.Generator().manual_seed(123))
    loud = torch.logspace(-1, 1, width)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 16, generator=g) @ mixing + 0.1 * torch.randn(rows, width, generator=g)) * loud


def test_without_correlations_gptq_is_round_to_nearest() -> None:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    assert all(
        torch.equal(a, b)
        for a, b in zip(gptq_int4(w, torch.eye(128), 32), quantize_int4_with_points(w, 32), strict=True)
    )


def test_gptq_moves_the_layer_outputs_less_than_round_to_nearest() -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    x = correlated_inputs(2048, 256)
    hessian = 2 * x.t() @ x / x.shape[0]
    for group in (32, 64, 128):
        rtn = dequantize(*quantize_int4_with_points(w, group), group)
        q, scale, point = gptq_int4(w, hessian, group)
        assert q.dtype == point.dtype == torch.uint8
        assert int(q.max()) <= 15
        assert int(point.max()) <= 15
        assert torch.equal(scale, scale.to(torch.bfloat16).float())  # the kernels' bf16 scale exactly
        gptq = dequantize(q, scale, point, group)
        x_test = correlated_inputs(512, 256, seed=9)  # inputs it did not see, from the same distribution
        err_rtn = float((x_test @ (w - rtn).t()).norm())
        err_gptq = float((x_test @ (w - gptq).t()).norm())
        assert err_gptq < 0.8 * err_rtn, (group, err_gptq, err_rtn)


def test_layers_fed_one_tensor_share_one_hessian(tmp_path: object) -> None:
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from tests.support.tiny_models import tiny_glm

    model = AutoModelForCausalLM.from_pretrained(
        tiny_glm(Path(str(tmp_path)) / "glm"), dtype=torch.float32
    ).eval()
    batches = torch.randint(0, 500, (3, 24))
    stats = collect_statistics(model, batches, hessians=True)
    q, k, v = (stats.hessians[f"model.layers.0.self_attn.{n}_proj"] for n in "qkv")
    assert q is k is v
    assert stats.hessians["model.layers.0.self_attn.o_proj"] is not q
    # The Hessian of q_proj's input, computed outside the hooks: 2/n X^T X of the normed hidden states.
    seen: list[torch.Tensor] = []
    hook = model.get_submodule("model.layers.0.self_attn.q_proj").register_forward_hook(
        lambda _m, i, _o: seen.append(i[0].reshape(-1, i[0].shape[-1]))
    )
    with torch.no_grad():
        for row in batches:
            model(input_ids=row.unsqueeze(0))
    hook.remove()
    x = torch.cat(seen)
    assert torch.allclose(q, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    saved = Path(str(tmp_path))
    stats.save(saved / "a.safetensors", saved / "h.safetensors")
    again = type(stats).load(saved / "a.safetensors", saved / "h.safetensors")
    assert (
        again.hessians["model.layers.0.self_attn.k_proj"] is again.hessians["model.layers.0.self_attn.q_proj"]
    )
    assert torch.equal(
        again.hessians["model.layers.1.mlp.down_proj"], stats.hessians["model.layers.1.mlp.down_proj"]
    )
