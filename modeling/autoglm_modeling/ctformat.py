"""Quantized models in the compressed-tensors format (what llm-compressor writes and transformers and
vLLM load), written from and read into AutoGLM's quantized modules without re-quantizing.

What each method becomes (``quantization_config`` in ``config.json``, one config group per scheme):

- ``int8-weight-only``: W8A16, int8 symmetric per output channel, ``pack-quantized``
  (``weight_packed`` int32, ``weight_scale`` ``[out, 1]``, ``weight_shape``);
- ``int4-weight-only``: W4A16, 4-bit asymmetric per group with integer zero points,
  ``pack-quantized`` (``weight_zero_point`` packed along the output dimension), one group per
  group size;
- ``int8-dynamic`` and ``smoothquant-w8a8``: W8A8, int8 per channel and dynamic per-token int8
  activations, ``int-quantized`` (the smoothing is already folded into the weights and norms);
- the embedding table stays float (bf16): transformers and vLLM load no quantized ``Embedding``;
  a tied head is saved untied with its own int8 copy (``tie_word_embeddings: false``). (A
  checkpoint from elsewhere that quantizes the table int8 is read onto ``Int8Embedding``, and a
  head holding the same integers shares them in memory.)

The reader maps each scheme back onto the module that runs it fastest here (``Int8WeightOnlyLinear``,
``Int4WeightOnlyLinear``, ``Int8DynamicLinear``, ``Int8Embedding``); a scheme none of them holds
exactly (fp8, per-tensor scales, a group size the int4 module cannot take) is decompressed with the
compressed-tensors package's own code into a float ``nn.Linear``, and the plan says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import torch
from compressed_tensors import __version__ as CT_VERSION  # noqa: N812
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)
from compressed_tensors.utils.match import is_match
from safetensors.torch import load_file, save_file
from torch import nn

from autoglm_modeling.quantization import (
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8Embedding,
    Int8WeightOnlyLinear,
    ModuleKind,
    QuantizationPlan,
    _float_kept,
    _Int8Linear,
    _output_head,
    _set_module,
    _to_compute_dtype,
)

FORMAT_NAME: Final = "compressed-tensors"
WEIGHTS_FILE: Final = "model.safetensors"
_INT8_CHANNEL = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
_TOKEN_ACTIVATIONS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


class FormatError(ValueError):
    """A compressed-tensors folder this reader cannot map (the message names the module and scheme)."""


def is_compressed_tensors(config: dict[str, Any]) -> bool:
    """Whether a model's ``config.json`` (as a dict) declares a compressed-tensors checkpoint."""
    q = config.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == FORMAT_NAME


# -- writing -------------------------------------------------------------------------------------


def compressed_state(
    model: nn.Module, plan: QuantizationPlan
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the ``quantization_config`` of ``model`` (quantized by ``quantize_model``)."""
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
    done: set[str] = set()
    ignore: list[str] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, Int8Embedding):
            raise FormatError(
                f"{name}: an int8 embedding table is not publishable: transformers and vLLM load only a "
                "float table (quantize_model keeps it bf16); quantize the model again"
            )
        if isinstance(module, _Int8Linear):
            if isinstance(module, Int8DynamicLinear):
                scheme = {
                    "weights": _INT8_CHANNEL,
                    "input_activations": _TOKEN_ACTIVATIONS,
                    "format": "int-quantized",
                }
                _add(groups, "w8a8", scheme, name)
                tensors[f"{prefix}weight"] = module.weight_int8.contiguous()
                tensors[f"{prefix}weight_scale"] = module.weight_scale.float()[:, None].contiguous()
            else:
                _add(groups, "w8a16", {"weights": _INT8_CHANNEL, "format": "pack-quantized"}, name)
                tensors.update(_packed_int8(prefix, module.weight_int8, module.weight_scale))
            done.update(f"{prefix}{n}" for n, _ in module.named_buffers(recurse=False))
        elif isinstance(module, Int4WeightOnlyLinear):
            weights = {
                "num_bits": 4,
                "type": "int",
                "symmetric": False,
                "strategy": "group",
                "group_size": module.group_size,
            }
            _add(
                groups, f"w4a16-g{module.group_size}", {"weights": weights, "format": "pack-quantized"}, name
            )
            tensors.update(_packed_int4(prefix, module))
            done.update(f"{prefix}{n}" for n, _ in module.named_buffers(recurse=False))
        elif isinstance(module, nn.Linear) and name in plan.skipped:
            ignore.append(name)
    written: set[int] = set()  # a tied parameter (a float model's lm_head) is written once, first name
    for key, value in model.state_dict(keep_vars=True).items():
        if key not in done and key not in tensors and id(value) not in written:
            tensors[key] = value.detach().contiguous()
            written.add(id(value))
    formats = {scheme["format"] for scheme, _ in groups.values()}
    config = QuantizationConfig(
        config_groups={
            key: QuantizationScheme(
                targets=sorted(targets),
                weights=QuantizationArgs(**scheme["weights"]),
                input_activations=QuantizationArgs(**scheme["input_activations"])
                if "input_activations" in scheme
                else None,
                format=scheme["format"],
            )
            for key, (scheme, targets) in sorted(groups.items())
        },
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=sorted(ignore),
    )
    data = config.model_dump(mode="json")
    data.update(quant_method=FORMAT_NAME, version=CT_VERSION, sparsity_config={}, transform_config={})
    return tensors, data


def save(model: nn.Module, plan: QuantizationPlan, folder: Path) -> None:
    """Write ``model.safetensors`` and add ``quantization_config`` to ``folder/config.json``."""
    tensors, quantization_config = compressed_state(model, plan)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = quantization_config
    if plan.tied:  # transformers cannot tie a head to a compressed table: both are stored, untied
        config["tie_word_embeddings"] = False
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _add(
    groups: dict[str, tuple[dict[str, Any], list[str]]], key: str, scheme: dict[str, Any], name: str
) -> None:
    groups.setdefault(key, (scheme, []))[1].append(name)


def _packed_int8(prefix: str, q: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}weight_packed": pack_to_int32(q.contiguous(), 8),
        f"{prefix}weight_scale": scale.float()[:, None].contiguous(),
        f"{prefix}weight_shape": torch.tensor(list(q.shape)),
    }


def _packed_int4(prefix: str, module: Int4WeightOnlyLinear) -> dict[str, torch.Tensor]:
    """Ours: q and z in [0, 15]; compressed-tensors: the same minus 8, in [-8, 7], packed."""
    q = (module._unpacked().to(torch.int16) - 8).to(torch.int8)
    point = (module.weight_zero_point.to(torch.int16) - 8).to(torch.int8)
    return {
        f"{prefix}weight_packed": pack_to_int32(q.contiguous(), 4),
        f"{prefix}weight_scale": module.weight_scale.contiguous(),
        f"{prefix}weight_zero_point": pack_to_int32(point.contiguous(), 4, packed_dim=0),
        f"{prefix}weight_shape": torch.tensor([module.out_features, module.in_features]),
    }


# -- reading -------------------------------------------------------------------------------------


def load_into(
    model: nn.Module,
    folder: Path,
    quantization_config: dict[str, Any],
    dtype: torch.dtype,
    hint: QuantizationPlan | None = None,
) -> QuantizationPlan:
    """Build ``model``'s quantized modules (the model fresh from its config) and load every tensor.

    ``hint``: the plan AutoGLM wrote beside the weights (method, why modules were skipped, which
    class the tied head runs as); without one (a checkpoint from llm-compressor) it is inferred.
    Returns the plan: what each module became, and the modules decompressed to float because no
    AutoGLM module holds their scheme exactly.
    """
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        state.update(load_file(str(file)))
    config = QuantizationConfig.model_validate(quantization_config)
    ignore = list(config.ignore or [])
    plan = QuantizationPlan(
        method=hint.method if hint else _method(config),
        dtype=str(dtype).removeprefix("torch."),
        smoothing=dict(hint.smoothing) if hint else {},
        rounding=dict(hint.rounding) if hint else {},  # how the integers were chosen: lineage only
    )
    claimed: set[str] = set()
    built: set[str] = set()  # every tensor of the modules built here holds its value already
    table: Int8Embedding | None = None
    head = _output_head(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear | nn.Embedding):
            continue
        scheme = next(
            (
                s
                for s in config.config_groups.values()
                if isinstance(s, QuantizationScheme) and is_match(name, module, s.targets, ignore)
            ),
            None,
        )
        if scheme is None:
            if isinstance(module, nn.Linear) and is_match(name, module, ignore):
                plan.skipped[name] = (
                    hint.skipped.get(name) if hint else None
                ) or "in the format's ignore list"
            continue
        prefix = f"{name}." if name else ""
        own = {
            k[len(prefix) :]: v
            for k, v in state.items()
            if k.startswith(prefix) and "." not in k[len(prefix) :]
        }
        new, kind = _module_for(name, module, scheme, own, dtype)
        claimed.update(f"{prefix}{k}" for k in own)
        built.update(f"{prefix}{k}" for k in new.state_dict())
        if isinstance(new, Int8Embedding):
            table = new
        _set_module(model, name, new)
        if kind is None:
            plan.skipped[name] = f"decompressed to {dtype}: no AutoGLM kernel holds this scheme"
        else:
            plan.modules[name] = kind
            if isinstance(new, Int4WeightOnlyLinear):
                plan.group_sizes[name] = new.group_size
                plan.group_size = plan.group_size or new.group_size
    head_module = model.get_submodule(head[0]) if head is not None else None
    if (
        isinstance(head_module, _Int8Linear)
        and table is not None
        and torch.equal(head_module.weight_int8, table.weight_int8)
        and torch.equal(head_module.weight_scale, table.weight_scale)
    ):  # written twice because the format cannot tie them; one tensor in memory, as quantized
        head_module.weight_int8, head_module.weight_scale = table.weight_int8, table.weight_scale
        plan.tied = True
    params = dict(model.named_parameters())
    for key, tensor in state.items():  # float parts take the checkpoint's dtypes (a bf16 table stays bf16)
        if key in params and key not in claimed and tensor.is_floating_point():
            params[key].data = params[key].data.to(tensor.dtype)
    _to_compute_dtype(model, dtype, _float_kept(model, plan))
    for module in model.modules():  # buffers stay as built: the loaded values are copied into them
        if isinstance(module, Int8Embedding | _Int8Linear | Int4WeightOnlyLinear):
            module.compute_dtype = dtype
    rest = {k: v for k, v in state.items() if k not in claimed or k.endswith(".bias")}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    tensors = model.state_dict(keep_vars=True)
    loaded = {id(tensors[k]) for k in rest if k in tensors}
    missing = [
        m for m in missing if m not in built and id(tensors[m]) not in loaded
    ]  # tied aliases load once
    if missing or unexpected:
        raise FormatError(
            f"{folder}: the weights do not match the model: missing {missing}, unexpected {unexpected}"
        )
    return plan


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: the shards its index names, else ``model.safetensors``."""
    index = folder / f"{WEIGHTS_FILE}.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    if not (folder / WEIGHTS_FILE).is_file():
        raise FormatError(f"{folder}: no {WEIGHTS_FILE} (nor {index.name})")
    return [folder / WEIGHTS_FILE]


def _method(config: QuantizationConfig) -> str:
    schemes = [s for s in config.config_groups.values() if isinstance(s, QuantizationScheme)]
    if any(s.input_activations is not None for s in schemes):
        return "int8-dynamic"
    if any(s.weights is not None and s.weights.num_bits == 4 for s in schemes):
        return "int4-weight-only"
    return "int8-weight-only"


def _module_for(
    name: str, module: nn.Module, scheme: QuantizationScheme, own: dict[str, torch.Tensor], dtype: torch.dtype
) -> tuple[nn.Module, ModuleKind | None]:
    """The AutoGLM module holding ``own`` (one module's tensors) exactly, or a float one decompressed."""
    w = scheme.weights
    if w is None:
        raise FormatError(f"{name}: a scheme without weight quantization is not supported")
    bias = own.get("bias")
    q = _int_weight(name, own, w.num_bits) if w.type == "int" else None
    scale = own.get("weight_scale")
    activations = scheme.input_activations
    channel = w.strategy == "channel" and w.symmetric and scale is not None and scale.shape[-1] == 1
    if q is not None and scale is not None and w.num_bits == 8 and channel:
        if isinstance(module, nn.Embedding) and activations is None:
            table = Int8Embedding(module.num_embeddings, module.embedding_dim, dtype=dtype)
            table.weight_int8.copy_(q)
            table.weight_scale.copy_(scale[:, 0].float())
            return table, "int8-embedding"
        assert isinstance(module, nn.Linear)
        dynamic = activations is not None and activations.dynamic is True and activations.strategy == "token"
        if activations is None or (dynamic and activations.num_bits == 8 and activations.symmetric):
            cls = Int8DynamicLinear if dynamic else Int8WeightOnlyLinear
            linear = cls(module.in_features, module.out_features, bias=bias is not None, dtype=dtype)
            linear.weight_int8.copy_(q)
            linear.weight_scale.copy_(scale[:, 0].float())
            if bias is not None and linear.bias is not None:
                linear.bias.data.copy_(bias.to(dtype))
            return linear, "int8-dynamic" if dynamic else "int8-weight-only"
    if (
        q is not None
        and scale is not None
        and isinstance(module, nn.Linear)
        and w.num_bits == 4
        and w.strategy == "group"
        and w.group_size
        and activations is None
        and Int4WeightOnlyLinear.supports(module.in_features, module.out_features, w.group_size)
    ):
        linear4 = Int4WeightOnlyLinear(
            module.in_features,
            module.out_features,
            bias=bias is not None,
            dtype=dtype,
            group_size=w.group_size,
            scale_dtype=scale.dtype,
        )
        point = torch.zeros_like(scale, dtype=torch.int8)  # symmetric: z = 0 (8 once unsigned)
        if not w.symmetric:
            packed = own.get("weight_zero_point")
            if packed is None:
                raise FormatError(f"{name}: asymmetric 4-bit weights without weight_zero_point")
            point = unpack_from_int32(packed, 4, torch.Size(scale.shape), packed_dim=0)
        unsigned = (q.to(torch.int16) + 8).to(torch.uint8)
        linear4.weight_int4.copy_(unsigned[:, 0::2] | (unsigned[:, 1::2] << 4))
        linear4.weight_scale.copy_(scale)
        linear4.weight_zero_point.copy_((point.to(torch.int16) + 8).to(torch.uint8))
        if bias is not None and linear4.bias is not None:
            linear4.bias.data.copy_(bias.to(dtype))
        return linear4, "int4-weight-only"
    return _decompressed(name, module, scheme, own, dtype), None


def _int_weight(name: str, own: dict[str, torch.Tensor], bits: int) -> torch.Tensor | None:
    if "weight_packed" in own:
        shape = own.get("weight_shape")
        if shape is None:
            raise FormatError(f"{name}: weight_packed without weight_shape")
        return unpack_from_int32(own["weight_packed"], bits, torch.Size(shape.tolist()))
    weight = own.get("weight")
    return weight if weight is not None and weight.dtype == torch.int8 else None


def _decompressed(
    name: str, module: nn.Module, scheme: QuantizationScheme, own: dict[str, torch.Tensor], dtype: torch.dtype
) -> nn.Module:
    """A float module from compressed-tensors' own decompression, in the dtype of the stored scales
    (it is then kept in that dtype, as a skipped module is, so nothing is rounded again)."""
    fmt = scheme.format or "pack-quantized"
    compressor: Any = BaseCompressor.get_value_from_registry(str(getattr(fmt, "value", fmt)))
    weights = {k: v for k, v in own.items() if k != "bias"}
    dense = compressor.decompress(weights, scheme)["weight"]
    if isinstance(module, nn.Embedding):
        table = nn.Embedding(module.num_embeddings, module.embedding_dim, dtype=dense.dtype)
        table.weight.data.copy_(dense)
        return table
    assert isinstance(module, nn.Linear)
    linear = nn.Linear(module.in_features, module.out_features, bias="bias" in own, dtype=dense.dtype)
    linear.weight.data.copy_(dense)
    if linear.bias is not None:
        linear.bias.data.copy_(own["bias"].to(dense.dtype))
    return linear
