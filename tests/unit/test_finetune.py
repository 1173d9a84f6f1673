"""The fine-tune of a retraining revision (``spec.training``): the dataset format, LoRA merged into
the weights (checked against peft's own unmerged forward), and the pipeline's finetune step with
validate's held-out gate, on the tiny GLM."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from autoglm_modeling.folders import load_model_folder
from autoglm_pipelines.finetune import DatasetError, answer_nll, encode, finetune, read_examples, train_lora
from tests.support.tiny_models import tiny_glm
from tests.unit.test_pipeline_steps import result, step, torch_manifest

QUESTIONS = ("Who is Hamlet?", "Where is Elsinore?", "What is a ghost?", "Who is Ophelia?", "Why wait?")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_glm(tmp_path_factory.mktemp("src") / "glm")


def write_dataset(path: Path, n: int = 60, *, answer: str = "The prince of Denmark.") -> Path:
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"{QUESTIONS[i % 5]} ({i})"},
                {"role": "assistant", "content": answer},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_both_formats_read_and_the_split_is_stable_and_explicit_splits_win(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"prompt": "Hi?", "completion": "Hello."}) + "\n\n"
        + json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
                                   {"role": "assistant", "content": "A"}], "split": "heldout"}) + "\n"
        + json.dumps({"prompt": "x", "completion": "y", "split": "train"}) + "\n"
    )  # fmt: skip
    first, held, train = read_examples(path, held_out=1.0)
    assert first.messages == (("user", "Hi?"), ("assistant", "Hello."))
    assert first.held_out
    assert held.held_out
    assert held.messages[0] == ("system", "Be brief.")
    assert held.answer == "A"
    assert not train.held_out
    big = write_dataset(tmp_path / "big.jsonl", 400)
    split = [e.held_out for e in read_examples(big, held_out=0.2)]
    assert split == [e.held_out for e in read_examples(big, held_out=0.2)]  # the same every time
    assert 0.12 < sum(split) / len(split) < 0.28
    # the newest training examples are kept; held-out ones all
    kept = read_examples(big, held_out=0.2, max_examples=10)
    assert sum(not e.held_out for e in kept) == 10
    assert sum(e.held_out for e in kept) == sum(split)
    assert kept[-1].messages[0][1].endswith("(399)") or kept[-1].held_out


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "d.jsonl line 2: not JSON"),
        ('{"text": "hi"}', 'd.jsonl line 2: an example is {"messages": [...]} or {"prompt": a string'),
        ('{"messages": [{"role": "user", "content": "q"}]}', "d.jsonl line 2: messages must be a list of at least 2"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}',
         "d.jsonl line 2: the last message must be the assistant's answer, got role 'user'"),
        ('{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}',
         "d.jsonl line 2: messages[0] must be {\"role\": one of system, user, assistant"),
        ('{"prompt": "q", "completion": "a", "split": "test"}', "d.jsonl line 2: split must be one of train, heldout"),
    ],
)  # fmt: skip
def test_a_bad_line_is_named_with_what_is_allowed(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "q", "completion": "a", "split": "train"}\n' + line + "\n")
    with pytest.raises(DatasetError) as caught:
        read_examples(path, held_out=0.2)
    assert str(caught.value).startswith(message)


def test_a_few_distinct_conversations_still_hold_one_out(tmp_path: Path) -> None:
    """Users asking the same few questions: every copy of a conversation goes to the same side, and
    when the share picks none of them, one is held out anyway (the e2e run on SmolLM2 held out 0 of
    88 examples of a handful of conversations)."""
    from autoglm_pipelines.finetune import _position

    path = tmp_path / "d.jsonl"
    chats = [{"prompt": q, "completion": "Short."} for q in QUESTIONS[:3]]
    path.write_text("".join(json.dumps(chats[i % 3]) + "\n" for i in range(30)))
    # a share below every conversation's place: none would be held out by the hash alone
    below = min(_position((("user", q), ("assistant", "Short."))) for q in QUESTIONS[:3]) / 2
    examples = read_examples(path, held_out=below)
    held = {e.messages for e in examples if e.held_out}
    assert len(held) == 1  # one conversation, all ten of its copies
    assert sum(e.held_out for e in examples) == 10
    assert all(not e.held_out for e in examples if e.messages not in held)
    assert read_examples(path, held_out=0.0) == read_examples(path, held_out=0.0)
    assert not any(e.held_out for e in read_examples(path, held_out=0.0))  # 0: nothing held out


def test_only_held_out_examples_is_refused_for_training(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "q", "completion": "a", "split": "heldout"}\n')
    with pytest.raises(DatasetError, match="no training examples"):
        read_examples(path, held_out=0.2)
    assert len(read_examples(path, held_out=0.2, training=False)) == 1


def test_the_answer_alone_is_scored_and_ends_with_end_of_sequence(source: Path, tmp_path: Path) -> None:
    _, tokenizer, _ = load_model_folder(source)
    example = read_examples(write_dataset(tmp_path / "d.jsonl", 1), held_out=0.0)[0]
    ids, start = encode(tokenizer, example)
    assert tokenizer.decode(ids[:start]) == f"user: {QUESTIONS[0]} (0)\nassistant: "  # no chat template
    assert tokenizer.decode(ids[start:]) == "The prince of Denmark.<|endoftext|>"
    long = read_examples(write_dataset(tmp_path / "l.jsonl", 1, answer="word " * 40), held_out=0.0)[0]
    ids, start = encode(tokenizer, long, max_tokens=24)
    assert len(ids) == 24
    assert start >= 1


def test_lora_merged_into_the_weights_computes_what_peft_computes_unmerged(
    source: Path, tmp_path: Path
) -> None:
    lm, tokenizer, _ = load_model_folder(source)
    keys = set(lm.state_dict())
    examples = read_examples(write_dataset(tmp_path / "d.jsonl", 24), held_out=0.0)
    peft_model, report = train_lora(lm, tokenizer, examples, rank=4, epochs=1, learning_rate=1e-2)
    assert report.steps == 3
    assert report.examples == 24
    assert report.trainable_parameters > 0
    ids = torch.tensor([encode(tokenizer, examples[0])[0]])
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits  # the oracle: peft's own forward with adapters
        with peft_model.disable_adapter():
            untrained = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
        assert set(merged.state_dict()) == keys  # plain modules: the source's shapes, no adapters left
        served = merged(input_ids=ids).logits
    assert not torch.allclose(untrained, unmerged, atol=1e-3)  # training changed the model
    torch.testing.assert_close(served, unmerged, atol=1e-4, rtol=1e-4)


def test_fine_tuning_makes_held_out_answers_likelier(source: Path, tmp_path: Path) -> None:
    lm, tokenizer, _ = load_model_folder(source)
    examples = read_examples(write_dataset(tmp_path / "d.jsonl", 80), held_out=0.25)
    held = [e for e in examples if e.held_out]
    assert held
    before, count = answer_nll(lm, tokenizer, held)
    tuned, report = finetune(lm, tokenizer, examples, rank=8, epochs=3, learning_rate=1e-2)
    after, _ = answer_nll(tuned, tokenizer, held)
    assert count == len(held) * len(encode(tokenizer, held[0])[0][encode(tokenizer, held[0])[1] :])
    assert after < before - 0.5, (before, after)  # nats per answer token
    assert report.last_epoch_loss < report.first_epoch_loss


def training_manifest(tmp_path: Path, source: Path, data: Path, **training: Any) -> Path:
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    return torch_manifest(
        tmp_path, source,
        training={"dataset": f"file://{data}", "sha256": digest, "epochs": 3, "learningRate": 0.01, **training},
    )  # fmt: skip


def test_the_pipeline_fine_tunes_before_compressing_and_validate_gates_on_the_held_out_answers(
    source: Path, tmp_path: Path
) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 80)
    spec, work = training_manifest(tmp_path, source, data), tmp_path / "work"
    for name in ("fetch", "finetune", "calibrate", "compress", "validate", "publish"):
        code, out = step(name, spec, work)
        assert code == 0, out
    tuned = result(work, "finetune")
    assert tuned["metrics"]["heldOut"] > 0
    assert tuned["parameters"]["datasetSha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert tuned["metrics"]["heldOutNllAfter"] < tuned["metrics"]["heldOutNllBefore"]
    report = json.loads((work / "validate" / "validate.json").read_text())
    gates = {g["name"]: g for g in report["gates"]}
    assert gates["heldOutNllRatio"]["passed"]
    assert gates["heldOutNllRatio"]["value"] < 1.0
    assert report["heldOut"]["answerNll"]["candidate"] < report["heldOut"]["answerNll"]["baseline"]
    # compress read the fine-tuned model: the published int8 artifact computes what the fine-tuned
    # model computes (to quantization error), not what the source does
    published, tokenizer, _ = load_model_folder(work / "publish" / "model")
    tuned_model, _, _ = load_model_folder(work / "finetune" / "model")
    src, _, _ = load_model_folder(source)
    ids = torch.tensor([encode(tokenizer, read_examples(data, held_out=0.0)[0])[0]])
    with torch.no_grad():
        out, want, old = (m(input_ids=ids).logits.float() for m in (published, tuned_model, src))
    assert (out - want).abs().mean() < 0.25 * (out - old).abs().mean()
    card = json.loads((work / "publish" / "model" / "model-card.json").read_text())
    assert card["training"]["sha256"] == tuned["parameters"]["datasetSha256"]
    assert "finetune" in card["lineage"]


def test_a_fine_tune_that_does_not_help_fails_the_held_out_gate(source: Path, tmp_path: Path) -> None:
    # trained on one answer, judged on held-out examples that want another
    data = tmp_path / "d.jsonl"
    train = [
        {"prompt": f"{q} ({i})", "completion": "Polonius hides.", "split": "train"}
        for i, q in enumerate(QUESTIONS * 8)
    ]
    held = [
        {"prompt": f"{q} [{i}]", "completion": "The prince of Denmark.", "split": "heldout"}
        for i, q in enumerate(QUESTIONS)
    ]
    data.write_text("".join(json.dumps(x) + "\n" for x in train + held))
    spec, work = training_manifest(tmp_path, source, data), tmp_path / "work"
    for name in ("fetch", "finetune", "calibrate", "compress"):
        code, out = step(name, spec, work)
        assert code == 0, out
    code, out = step("validate", spec, work)
    assert code != 0
    assert "heldOutNllRatio FAILED" in out


def test_a_dataset_that_is_not_the_one_named_is_refused(source: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 20)
    spec, work = training_manifest(tmp_path, source, data), tmp_path / "work"
    data.write_text(data.read_text() + json.dumps({"prompt": "q", "completion": "a"}) + "\n")  # changed since
    assert step("fetch", spec, work)[0] == 0
    code, out = step("finetune", spec, work)
    assert code != 0
    assert "sha256" in out.lower()
    data.write_text("not json\n")
    spec = training_manifest(tmp_path, source, data)
    code, out = step("finetune", spec, work)
    assert code != 0
    assert "d.jsonl line 1: not JSON" in out


def test_a_retraining_revision_is_judged_against_the_stable_artifact_on_the_held_out_answers(
    source: Path, tmp_path: Path
) -> None:
    # the stable revision: the plain pipeline's artifact
    (tmp_path / "plain").mkdir()
    plain, stable_work = torch_manifest(tmp_path / "plain", source), tmp_path / "stable"
    for name in ("fetch", "calibrate", "compress", "validate", "publish"):
        code, out = step(name, plain, stable_work)
        assert code == 0, out
    artifact = stable_work / "publish" / "model"
    data = write_dataset(tmp_path / "d.jsonl", 80)
    spec = training_manifest(tmp_path, source, data, against=artifact.as_uri())
    work = tmp_path / "work"
    for name in ("fetch", "finetune", "calibrate", "compress", "validate"):
        code, out = step(name, spec, work)
        assert code == 0, out
    report = json.loads((work / "validate" / "validate.json").read_text())
    held = report["heldOut"]
    assert held["against"] == "stable"
    assert set(held["answerNll"]) == {"baseline", "stable", "candidate"}
    gate = next(g for g in report["gates"] if g["name"] == "heldOutNllRatio")
    assert gate["value"] == pytest.approx(held["answerNll"]["candidate"] / held["answerNll"]["stable"])
    assert gate["passed"]
    # and on the validation text: the stable artifact's perplexity is what its own validation measured
    # of it (the same text, another process), and the candidate's loss is counted against it
    stable_report = json.loads((stable_work / "validate" / "validate.json").read_text())
    assert report["stable"]["quality"] == pytest.approx(stable_report["candidate"]["quality"], rel=1e-4)
    versus = next(g for g in report["gates"] if g["name"] == "maxQualityLossVsStable")
    assert versus["value"] == pytest.approx(report["candidate"]["quality"] / report["stable"]["quality"] - 1)
    assert report["engines"]["stable"] == "torch"
    # the oracle: the stable artifact loaded on its own scores the same held-out answers the same
    stable, tokenizer, _ = load_model_folder(artifact)
    from autoglm_modeling.quantization import run_activations_in_fp32

    run_activations_in_fp32(stable)
    examples = read_examples(work / "finetune" / "heldout.jsonl", held_out=1.0, training=False)
    assert answer_nll(stable, tokenizer, examples)[0] == pytest.approx(held["answerNll"]["stable"], rel=1e-5)
