"""Write a Hugging Face Llama-family or GLM model folder as GGUF, and quantize GGUF with llama.cpp's own quantizer.

``export_gguf`` reads the folder's safetensors (never pickles) and writes F32 or F16 GGUF with the
``gguf`` package's writer: the llama.cpp tensor names (``gguf.TensorNameMap``), the hyper-parameters,
and the tokenizer. Two layout rules of llama.cpp's own converter apply:

- llama.cpp's ``llama`` architecture rotates query/key pairs that sit next to each other, while
  Hugging Face's Llama rotates the two halves of each head, so the rows of ``q_proj`` and ``k_proj``
  are permuted per head (transformers' GGUF loader undoes exactly this);
- a tied ``lm_head`` is not written: llama.cpp reads the output projection from ``token_embd``.

The tokenizer's GGUF fields are copied from a reference GGUF when the model came from one (the
fetched source), so llama.cpp tokenizes as before; otherwise they are built from ``tokenizer.json``.
The server itself always tokenizes with the folder's Hugging Face tokenizer and hands token ids to
the engine, so both engines see the same ids.

``quantize_gguf`` calls ``llama_model_quantize`` from ``llama-cpp-python`` (the optional
``llamacpp`` extra): the same code as llama.cpp's ``llama-quantize`` tool.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, Literal

import gguf
import numpy as np
from safetensors import safe_open

from autoglm_core.uris import SourceError

log = logging.getLogger(__name__)

#: GGUF kinds AutoGLM publishes, with llama.cpp's file-type numbers.
QuantKind = Literal["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M"]
FILE_TYPES: Final[dict[str, gguf.LlamaFileType]] = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M,
}
#: Architectures written so far, with their GGUF architecture. transformers' GLM (GLM-4's ``-hf``
#: checkpoints) is llama.cpp's ``chatglm``: separate q/k/v with biases, the fused gate/up projection
#: as one ``ffn_up`` of twice the width (SwiGLU on its halves, gate first), and rotary on the first
#: ``partial_rotary_factor`` of each head on adjacent pairs, which is llama.cpp's own layout.
ARCHITECTURES: Final = {"LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA, "GlmForCausalLM": gguf.MODEL_ARCH.CHATGLM}


class GGUFExportError(SourceError):
    """A folder that cannot be written as GGUF, or a quantization llama.cpp refused."""


def export_gguf(
    folder: Path, out: Path, *, dtype: Literal["F32", "F16"] = "F16", tokenizer_from: Path | None = None
) -> Path:
    """Write ``folder`` (config.json, safetensors, tokenizer.json) as one GGUF file at ``out``."""
    config = _read_json(folder / "config.json")
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise GGUFExportError(
            f"{folder}: {architecture} cannot be written as GGUF yet; supported: {', '.join(ARCHITECTURES)}"
        )
    if config.get("quantization_config"):
        raise GGUFExportError(
            f"{folder}: already quantized ({config['quantization_config'].get('format', '?')}); export the "
            "unquantized model and let llama.cpp's quantizer make the GGUF kinds"
        )
    arch = ARCHITECTURES[architecture]
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    if arch == gguf.MODEL_ARCH.CHATGLM and heads * head_dim != hidden:
        raise GGUFExportError(
            f"{folder}: llama.cpp's chatglm layout needs attention heads x head_dim = hidden_size, got "
            f"{heads} x {head_dim} != {hidden} (structured pruning removed heads); prune the MLP only "
            "(keep heads) or serve it on torch"
        )
    tied = bool(config.get("tie_word_embeddings", False))
    llama = arch == gguf.MODEL_ARCH.LLAMA
    rotary = int(head_dim * _partial_rotary(config))

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(str(config.get("_name_or_path") or folder.name))
    writer.add_block_count(layers)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(rotary)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(FILE_TYPES[dtype])
    _rope_scaling(writer, config)
    _tokenizer(writer, folder, tokenizer_from)

    names = gguf.TensorNameMap(arch, layers)
    embedding = None
    for name, array in _tensors(folder):
        if tied and name == "lm_head.weight":
            continue
        if name.endswith(("rotary_emb.inv_freq",)):
            continue
        if name == "model.embed_tokens.weight":
            embedding = array
        if llama and name.endswith("self_attn.q_proj.weight"):  # GLM rotates adjacent pairs already
            array = _permute(array, heads)
        elif llama and name.endswith("self_attn.k_proj.weight"):
            array = _permute(array, kv_heads)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise GGUFExportError(f"{folder}: tensor {name} has no llama.cpp name in the {arch.name} layout")
        # Norms and other 1-D tensors stay F32, as llama.cpp's converter keeps them.
        keep_f32 = dtype == "F32" or array.ndim == 1
        writer.add_tensor(target, array.astype(np.float32 if keep_f32 else np.float16))
    if tied and not llama and embedding is not None:  # chatglm reads its output projection from `output`
        writer.add_tensor("output.weight", embedding.astype(np.float32 if dtype == "F32" else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, out)
    return out


#: The files of a model folder a GGUF artifact keeps beside ``model.gguf``: the server reads the
#: tokenizer, context length and end-of-turn ids from them, as it does for safetensors artifacts.
BESIDE_GGUF: Final = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja",
)  # fmt: skip


def write_gguf_folder(
    source: Path,
    folder: Path,
    kind: QuantKind,
    *,
    tokenizer_from: Path | None = None,
    exported: Path | None = None,
    base: Literal["F32", "F16"] = "F16",
) -> Path:
    """``source`` as a llama.cpp artifact in ``folder``: ``model.gguf`` of ``kind`` (F32/F16 written
    here, the others quantized by llama.cpp from a ``base`` export) beside the files in
    ``BESIDE_GGUF``. ``exported``: a ``base`` export of ``source`` already made (reused, else written
    and removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.gguf"
    if kind in ("F32", "F16"):
        export_gguf(source, target, dtype=kind, tokenizer_from=tokenizer_from)
    else:
        made = exported is None
        exported = exported or export_gguf(
            source, folder / f"model-{base.lower()}.gguf.tmp", dtype=base, tokenizer_from=tokenizer_from
        )
        try:
            quantize_gguf(exported, target, kind)
        finally:
            if made:
                exported.unlink(missing_ok=True)
    for name in BESIDE_GGUF:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    return folder


def quantize_gguf(source: Path, out: Path, kind: QuantKind, *, threads: int | None = None) -> Path:
    """Quantize an F32/F16 GGUF to ``kind`` with llama.cpp's quantizer (``llama-cpp-python``)."""
    llama_cpp = require_llama_cpp("quantizing GGUF")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(FILE_TYPES[kind])
    params.nthread = threads or max(os.cpu_count() or 1, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if rc != 0:
        partial.unlink(missing_ok=True)
        raise GGUFExportError(
            f"llama.cpp could not quantize {source} to {kind} (llama_model_quantize returned {rc})"
        )
    os.replace(partial, out)
    return out


_LLAMA_LOCK = threading.Lock()
_LLAMA_READY = False
_LOG_CALLBACK: Any = None  # kept alive: llama.cpp holds the pointer


def _import_llama_cpp() -> Any:
    """``llama_cpp``, its backend initialised once and its log lines routed to ours (warnings and
    errors only: llama.cpp prints every tensor it loads or quantizes otherwise)."""
    global _LLAMA_READY, _LOG_CALLBACK
    import llama_cpp  # optional extra: imported only when asked for

    with _LLAMA_LOCK:
        if _LLAMA_READY:
            return llama_cpp
        llama_cpp.llama_backend_init()

        def forward(level: int, text: bytes, _user: Any) -> None:
            if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
                log.warning("llama.cpp: %s", text.decode(errors="replace").rstrip())

        _LOG_CALLBACK = llama_cpp.llama_log_callback(forward)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        # llama_cpp._utils opens os.devnull twice at import and never closes it: closed at exit,
        # so the interpreter's shutdown does not print two ResourceWarnings after everything else.
        utils = sys.modules.get("llama_cpp._utils")
        for name in ("outnull_file", "errnull_file"):
            if (handle := getattr(utils, name, None)) is not None:
                atexit.register(handle.close)
        _LLAMA_READY = True
    return llama_cpp


def require_llama_cpp(what: str) -> Any:
    """The ``llama_cpp`` module, or an error saying how to install it."""
    try:
        return _import_llama_cpp()
    except ImportError as exc:
        raise GGUFExportError(
            f"{what} needs llama.cpp: `make install-llamacpp` (builds llama-cpp-python, about 4 minutes on 2 cores)"
        ) from exc


def llama_cpp_available() -> bool:
    """Whether llama.cpp can be used here: installed, and its library loads (a broken build, e.g. one
    made for another CPU, counts as absent: what would have used it falls back and says why)."""
    try:
        _import_llama_cpp()
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of the tensors in ``path``: what serving it holds, without the tokenizer and other
    metadata (about 2 MB for SmolLM2's vocabulary), as torch's figure counts parameters alone."""
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def gguf_kind(path: Path) -> str:
    """The GGUF file type of ``path`` as its name (``Q8_0``, ``F16``, ...)."""
    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.parts[field.data[0]][0])
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return str(value)


# -- helpers --------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GGUFExportError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise GGUFExportError(f"{path}: not a JSON object")
    return data


def _rope_theta(config: dict[str, Any]) -> float:
    if "rope_theta" in config:
        return float(config["rope_theta"])
    parameters = config.get("rope_parameters") or {}
    return float(parameters.get("rope_theta", 10000.0))


def _partial_rotary(config: dict[str, Any]) -> float:
    """The share of each head that is rotated (GLM: half; Llama: all)."""
    if "partial_rotary_factor" in config:
        return float(config["partial_rotary_factor"])
    return float((config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))


def _rope_scaling(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind in ("default", None):
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        return
    raise GGUFExportError(f"rope scaling {kind!r} is not written to GGUF yet; supported: default, linear")


def _tensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{folder}: no .safetensors weights")
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open has no __iter__)
                yield name, handle.get_tensor(name).astype(np.float32)


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's half-split rotary layout to llama.cpp's interleaved one, per head."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _tokenizer(writer: gguf.GGUFWriter, folder: Path, reference: Path | None) -> None:
    if reference is not None:
        _copy_tokenizer(writer, reference)
        return
    data = _read_json(folder / "tokenizer.json")
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(
            f"{folder}: tokenizer model {model.get('type')!r}; GGUF export supports byte-level BPE tokenizers"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, token in added.items():
        vocab.setdefault(content, int(token["id"]))
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, index in vocab.items():
        tokens[index] = text
        token = added.get(text)
        if token is None:
            types[index] = gguf.TokenType.NORMAL
        else:
            types[index] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    settings = (
        _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    )
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):  # fmt: skip
        value = settings.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in vocab:
            add(vocab[value])
    writer.add_add_bos_token(bool(settings.get("add_bos_token", False)))
    template = folder / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text())
    elif isinstance(settings.get("chat_template"), str):
        writer.add_chat_template(settings["chat_template"])


def _copy_tokenizer(writer: gguf.GGUFWriter, reference: Path) -> None:
    reader = gguf.GGUFReader(reference)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), kind)
