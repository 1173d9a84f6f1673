"""Supervised fine-tuning of the source on conversations (``spec.training``): LoRA adapters
(``peft``) trained on the answers only, then merged into the weights, so the rest of the pipeline
(calibration, compression, validation) and the servers see a plain model of the same shape.

The dataset is JSON Lines. Each line is ``{"messages": [...]}`` whose last message is the
assistant's answer to learn (the ones before it are the prompt, system prompt included), or
``{"prompt": "...", "completion": "..."}``; ``"split": "heldout"`` (or ``"train"``) places it, and
a line without one is held out when the SHA-256 of its conversation falls in the ``heldOut``
share, so a dataset always splits the same way and every copy of a conversation falls on the same
side (when none falls in the share, the first of two or more distinct conversations is held out).
Held-out examples are never trained on: validate scores the answers' negative log-likelihood on
them, candidate against the stable revision's artifact (``training.against``) or the source.

The prompt is formatted by the tokenizer's chat template (what the server applies to a chat
request), or as ``role: content`` lines where the tokenizer has none; the answer ends with the
end-of-sequence token, so the model also learns where to stop.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

#: Tokens of one example at most: a longer prompt loses its start (the answer is kept whole, up to this).
MAX_TOKENS = 512
BATCH_SIZE = 8
SPLITS = ("train", "heldout")
ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """A line of the dataset is not an example; the message names the line and what is allowed."""


@dataclass(frozen=True)
class Example:
    """One conversation: ``messages[:-1]`` are the prompt, ``messages[-1]`` the answer to learn."""

    messages: tuple[tuple[str, str], ...]
    held_out: bool

    @property
    def answer(self) -> str:
        return self.messages[-1][1]


def _messages(data: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    if "messages" in data:
        raw = data["messages"]
        if not isinstance(raw, list) or len(raw) < 2:
            raise DatasetError(
                f"{where}: messages must be a list of at least 2 messages (a prompt and the answer)"
            )
        out = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DatasetError(
                    f'{where}: messages[{i}] must be {{"role": one of {", ".join(ROLES)}, "content": a string}}'
                )
            out.append((str(m["role"]), str(m["content"])))
        if out[-1][0] != "assistant":
            raise DatasetError(
                f"{where}: the last message must be the assistant's answer, got role {out[-1][0]!r}"
            )
        return tuple(out)
    prompt, completion = data.get("prompt"), data.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return (("user", prompt), ("assistant", completion))
    raise DatasetError(
        f'{where}: an example is {{"messages": [...]}} or {{"prompt": a string, "completion": a string}}'
    )


def _position(messages: tuple[tuple[str, str], ...]) -> float:
    """Where a conversation's SHA-256 places it in [0, 1): the same place every time."""
    digest = hashlib.sha256(json.dumps(messages).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def read_examples(
    path: Path, *, held_out: float, max_examples: int | None = None, training: bool = True
) -> list[Example]:
    """The dataset's examples in file order; the newest ``max_examples`` training examples are kept
    (held-out ones all). Raises ``DatasetError`` naming the first bad line, or when ``training`` and
    no example is left to train on."""
    examples: list[Example] = []
    #: Each distinct conversation without a split, and where its hash places it in [0, 1).
    unsplit: dict[tuple[tuple[str, str], ...], float] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: the dataset is not UTF-8 text") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not JSON ({exc.msg})") from exc
        if not isinstance(data, dict):
            raise DatasetError(f"{where}: an example is a JSON object")
        messages = _messages(data, where)
        split = data.get("split")
        if split is not None and split not in SPLITS:
            raise DatasetError(f"{where}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        if split is None:
            if messages not in unsplit:  # users repeat conversations: hashed once each
                unsplit[messages] = _position(messages)
            held = unsplit[messages] < held_out
        else:
            held = split == "heldout"
        examples.append(Example(messages, held))
    # A few distinct conversations (users asking the same questions) can all fall outside the share:
    # then the one placed first is held out, so that validation has something unseen to score.
    if held_out > 0 and len(unsplit) >= 2 and min(unsplit.values()) >= held_out:
        first = min(unsplit, key=unsplit.__getitem__)
        examples = [Example(e.messages, True) if e.messages == first else e for e in examples]
    if training and not any(not e.held_out for e in examples):
        raise DatasetError(
            f"{path.name}: no training examples (all {len(examples)} are held out or the file is empty)"
        )
    if max_examples is not None:
        train = [i for i, e in enumerate(examples) if not e.held_out]
        dropped = set(train[: max(0, len(train) - max_examples)])
        examples = [e for i, e in enumerate(examples) if i not in dropped]
    return examples


def _prompt_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[tuple[str, str]]) -> str:
    chat = [{"role": r, "content": c} for r, c in messages]
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    return "".join(f"{r}: {c}\n" for r, c in messages) + "assistant: "


def encode(
    tokenizer: PreTrainedTokenizerBase, example: Example, *, max_tokens: int = MAX_TOKENS
) -> tuple[list[int], int]:
    """The example's token ids (prompt, answer, end of sequence) and where the answer starts."""
    prompt = tokenizer(_prompt_text(tokenizer, example.messages[:-1]), add_special_tokens=False)["input_ids"]
    answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer = [*answer, int(tokenizer.eos_token_id)]
    answer = answer[: max_tokens - 1]
    prompt = prompt[-(max_tokens - len(answer)) :] or prompt[-1:]
    return [*prompt, *answer], len(prompt)


def _batch(rows: Sequence[tuple[list[int], int]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, the attention mask, and labels that score the answers only."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, start) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, start : len(row)] = torch.tensor(row[start:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def answer_nll(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
) -> tuple[float, int]:
    """The mean negative log-likelihood per answer token over ``examples``, and how many tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [encode(tokenizer, e) for e in examples]
    for at in range(0, len(rows), BATCH_SIZE):
        batch = _batch(rows[at : at + BATCH_SIZE], int(pad))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        losses = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(losses)
        count += int((labels != -100).sum())
    model.train(was_training)
    return (total / count if count else math.nan), count


@dataclass(frozen=True)
class FineTuneReport:
    examples: int
    held_out: int
    steps: int
    trainable_parameters: int
    #: Mean training loss (per answer token) of the first and the last epoch.
    first_epoch_loss: float
    last_epoch_loss: float

    def to_json(self) -> dict[str, Any]:
        return {
            "examples": self.examples, "heldOut": self.held_out, "steps": self.steps,
            "trainableParameters": self.trainable_parameters,
            "firstEpochLoss": self.first_epoch_loss, "lastEpochLoss": self.last_epoch_loss,
        }  # fmt: skip


def train_lora(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    rank: int,
    epochs: int,
    learning_rate: float,
    seed: int = 0,
    rehearsal: torch.Tensor | None = None,
) -> tuple[Any, FineTuneReport]:
    """LoRA on every linear layer of the decoder (rank ``rank``, alpha twice that; ``peft``), AdamW on
    the answers' tokens of the training examples; returns the peft model (adapters unmerged).

    ``rehearsal``: token windows ``[n, length]`` of general text (the calibration data) whose
    language-modelling loss is added at every step, one window per step in turn, so the model
    keeps what it knew (rehearsal against catastrophic forgetting)."""
    from peft import LoraConfig, get_peft_model

    train = [e for e in examples if not e.held_out]
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", bias="none"
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # peft 0.21 asks transformers 5.24 for a property it deprecated
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [encode(tokenizer, e) for e in train]
    order = random.Random(seed)
    losses: list[float] = []
    steps = 0
    peft_model.train()
    for _ in range(epochs):
        indices = list(range(len(rows)))
        order.shuffle(indices)
        total, tokens = 0.0, 0
        for at in range(0, len(indices), BATCH_SIZE):
            batch = _batch([rows[i] for i in indices[at : at + BATCH_SIZE]], int(pad))
            loss = peft_model(**batch).loss
            if rehearsal is not None and len(rehearsal):
                window = rehearsal[steps % len(rehearsal)].unsqueeze(0)
                loss = loss + peft_model(input_ids=window, labels=window).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, tokens = total + float(loss.detach()) * n, tokens + n
        losses.append(total / tokens if tokens else math.nan)
    peft_model.eval()
    report = FineTuneReport(
        examples=len(train), held_out=len(examples) - len(train), steps=steps,
        trainable_parameters=sum(p.numel() for p in trainable),
        first_epoch_loss=losses[0], last_epoch_loss=losses[-1],
    )  # fmt: skip
    return peft_model, report


def finetune(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    rank: int,
    epochs: int,
    learning_rate: float,
    seed: int = 0,
    rehearsal: torch.Tensor | None = None,
) -> tuple[Any, FineTuneReport]:
    """``train_lora``, then the adapters merged into the weights: the model returned has the
    source's modules and shapes."""
    peft_model, report = train_lora(
        model,
        tokenizer,
        examples,
        rank=rank,
        epochs=epochs,
        learning_rate=learning_rate,
        seed=seed,
        rehearsal=rehearsal,
    )
    merged = peft_model.merge_and_unload()  # a transformers PreTrainedModel again
    merged.eval()
    return merged, report
