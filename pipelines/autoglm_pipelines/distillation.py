"""Knowledge distillation: a smaller student learns from the float teacher on calibration text.

The student is the (possibly pruned) model with ``studentLayers`` of its decoder layers kept,
evenly spaced. Each step minimises, on one window of text:

- KL(teacher || student) on the logits at temperature T, times T^2, with T annealed linearly from
  ``temperature.start`` to ``temperature.end`` over the steps (soft targets first, sharp later);
- the mean squared error between each student layer's output and the teacher layer it came from;
- the language-modelling cross-entropy on the text itself.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from autoglm_core.camel import CamelModel


class DistillationReport(CamelModel, frozen=True):
    steps: int
    student_layers: int
    teacher_layers: int
    loss_first: float
    loss_last: float
    kl_last: float
    hidden_mse_last: float
    lm_loss_last: float


def _layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers: not a decoder-only Hugging Face model")
    return layers


def kept_layers(total: int, keep: int) -> list[int]:
    """``keep`` evenly spaced layer indices out of ``total``, always the first and the last."""
    if keep >= total:
        return list(range(total))
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def drop_layers(model: nn.Module, keep: int) -> list[int]:
    """Keep ``keep`` evenly spaced decoder layers of ``model`` in place; return the kept indices."""
    layers = _layers(model)
    indices = kept_layers(len(layers), keep)
    kept = nn.ModuleList(layers[i] for i in indices)
    for new_index, layer in enumerate(kept):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index  # the KV cache is indexed by it
    inner = getattr(model, "model")  # noqa: B009
    inner.layers = kept
    config: Any = getattr(model, "config")  # noqa: B009
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in indices]
    return indices


def distill(
    teacher: nn.Module,
    student: nn.Module,
    batches: torch.Tensor,
    *,
    steps: int,
    temperature_start: float,
    temperature_end: float,
    teacher_layer_of: list[int],
    learning_rate: float = 1e-4,
    hidden_weight: float = 1.0,
    lm_weight: float = 1.0,
) -> DistillationReport:
    """Train ``student`` in place for ``steps`` steps on the rows of ``batches`` (cycled)."""
    teacher.eval()
    student.train()
    params = [p for p in student.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    losses: list[tuple[float, float, float, float]] = []
    for step in range(steps):
        row = batches[step % batches.shape[0]].unsqueeze(0)
        fraction = step / max(steps - 1, 1)
        temperature = temperature_start + (temperature_end - temperature_start) * fraction
        with torch.no_grad():
            t_out = teacher(input_ids=row, output_hidden_states=True)
        s_out = student(input_ids=row, output_hidden_states=True)
        vocab = s_out.logits.shape[-1]
        s_logp = F.log_softmax(s_out.logits.float().view(-1, vocab) / temperature, dim=-1)
        t_logp = F.log_softmax(t_out.logits.float().view(-1, vocab) / temperature, dim=-1)
        kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * temperature**2
        mse = torch.stack(
            [
                F.mse_loss(s_out.hidden_states[i + 1].float(), t_out.hidden_states[t + 1].float())
                for i, t in enumerate(teacher_layer_of)
            ]
        ).mean()
        lm = F.cross_entropy(s_out.logits[0, :-1].float(), row[0, 1:])
        loss = kl + hidden_weight * mse + lm_weight * lm
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ValueError(f"distillation diverged at step {step} (loss {value}); lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append((value, float(kl.detach()), float(mse.detach()), float(lm.detach())))
    student.eval()
    for p in params:
        p.requires_grad_(False)
    window = max(1, min(10, steps // 4))
    first = sum(x[0] for x in losses[:window]) / window
    last = losses[-window:]
    return DistillationReport(
        steps=steps,
        student_layers=len(_layers(student)),
        teacher_layers=len(_layers(teacher)),
        loss_first=first,
        loss_last=sum(x[0] for x in last) / len(last),
        kl_last=sum(x[1] for x in last) / len(last),
        hidden_mse_last=sum(x[2] for x in last) / len(last),
        lm_loss_last=sum(x[3] for x in last) / len(last),
    )


def make_student(model: nn.Module, student_layers: int | None) -> tuple[nn.Module, list[int]]:
    """A copy of ``model`` with ``student_layers`` layers kept (all when None), and their indices."""
    student = copy.deepcopy(model)
    total = len(_layers(student))
    if student_layers is None or student_layers >= total:
        return student, list(range(total))
    return student, drop_layers(student, student_layers)
