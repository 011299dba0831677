"""Built-in data (splits disjoint, formats valid, answers right) and the evaluation helpers (no real model)."""

import json
import re

import pytest
import torch

from idlora_trl_app import data
from idlora_trl_app.data import safety, sft_tasks
from idlora_trl_app.evaluation import (evaluate_accuracy, generate, is_refusal, normalise, refusal_rates)


def _prompt(row) -> str:
    return row["prompt"][0]["content"]


@pytest.mark.parametrize("task", data.SFT_TASKS)
def test_sft_task_format_and_disjoint_splits(task):
    train, validation, test = (data.sft_rows(split, [task]) for split in data.SFT_SPLITS)
    assert len(train) >= 90 and len(validation) >= 36 and len(test) >= 100  # the quality protocol's sizes
    for row in train + validation + test:
        assert row["task"] == task
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["completion"]] == ["assistant"]
        assert row["answer"].strip() == row["answer"] != ""
        if task != "arithmetic":
            assert row["completion"][0]["content"] == row["answer"]
    prompts = [{_prompt(r) for r in rows} for rows in (train, validation, test)]
    assert [len(p) for p in prompts] == [len(train), len(validation), len(test)]  # no duplicates either
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]


def test_sft_rows_are_deterministic_and_balanced():
    assert data.sft_rows("train") == data.sft_rows("train")
    assert data.sft_rows("train", seed=1) != data.sft_rows("train")
    rows = data.sft_rows("train")
    assert [r["task"] for r in rows[:6]] == list(data.SFT_TASKS) * 2  # round-robin: every prefix is balanced
    held_out = data.sft_rows("test", per_task=5)
    assert len(held_out) == 15 and {r["task"] for r in held_out} == set(data.SFT_TASKS)
    ds = data.sft_dataset("train", "sentiment,arithmetic", max_samples=10)
    assert len(ds) == 10 and set(ds["task"]) == {"sentiment", "arithmetic"}
    assert set(ds.column_names) == {"prompt", "completion", "task", "answer"}


def test_arithmetic_answers_are_right_and_names_held_out():
    calculations = {}
    for split in data.SFT_SPLITS:
        calculations[split] = {r["completion"][0]["content"] for r in data.sft_rows(split, ["arithmetic"])}
        for row in data.sft_rows(split, ["arithmetic"]):
            a, b = map(int, re.findall(r"\d+", _prompt(row))[:2])
            added = "more" in _prompt(row)
            expected = a + b if added else a - b
            assert row["answer"] == str(expected) and expected > 0
            assert row["completion"][0]["content"] == f"{a} {'+' if added else '-'} {b} = {expected}"
            assert normalise("arithmetic", row["completion"][0]["content"]) == row["answer"]
    test_text = " ".join(_prompt(r) for r in data.sft_rows("test", ["arithmetic"]))
    train_text = " ".join(_prompt(r) for r in data.sft_rows("train", ["arithmetic"]))
    assert not any(re.search(rf"\b{n}\b", test_text) for n in sft_tasks.TRAIN_NAMES)
    assert not any(re.search(rf"\b{n}\b", train_text) for n in sft_tasks.TEST_NAMES + sft_tasks.VALIDATION_NAMES)
    assert not calculations["train"] & calculations["test"]  # "4 + 6 = 10" is never both learnt and tested
    assert not calculations["train"] & calculations["validation"]
    assert not calculations["validation"] & calculations["test"]


def test_sentiment_holds_out_adjectives_and_templates():
    train_text = " ".join(_prompt(r) for r in data.sft_rows("train", ["sentiment"]))
    validation_text = " ".join(_prompt(r) for r in data.sft_rows("validation", ["sentiment"]))
    held_out = (sft_tasks.TEST_POSITIVE + sft_tasks.TEST_NEGATIVE, sft_tasks.TEST_REVIEW_TEMPLATES)
    for adj in held_out[0]:
        assert not re.search(rf"\b{adj}\b", train_text + validation_text), adj
    for template in held_out[1]:
        assert template.split("{")[0] not in train_text + validation_text
    for adj in sft_tasks.VALIDATION_POSITIVE + sft_tasks.VALIDATION_NEGATIVE:
        assert not re.search(rf"\b{adj}\b", train_text), adj
    test = data.sft_rows("test", ["sentiment"])
    labels = [r["answer"] for r in test]
    assert labels.count("POSITIVE") == labels.count("NEGATIVE")  # balanced: majority guessing scores 0.5
    first = data.sft_rows("test", ["sentiment"], per_task=32)
    assert 8 <= sum(r["answer"] == "POSITIVE" for r in first) <= 24  # the evaluated prefix is mixed too


def test_instructions_use_held_out_words_and_exact_outputs():
    train_text = " ".join(_prompt(r) for r in data.sft_rows("train", ["instructions"]))
    assert not any(f'"{w}"' in train_text for w in sft_tasks.TEST_WORDS + sft_tasks.VALIDATION_WORDS)
    assert not set(sft_tasks.TEST_WORDS) & set(sft_tasks.VALIDATION_WORDS)
    answers = {r["answer"] for r in data.sft_rows("test", ["instructions"])}
    assert {"LEMON", "lemon lemon lemon", "[lemon]"} <= answers


def test_unknown_task_and_split_are_errors():
    with pytest.raises(data.DataError, match="unknown built-in task"):
        data.sft_rows("train", "sentiment,poetry")
    with pytest.raises(data.DataError, match="unknown split"):
        data.sft_rows("dev")
    with pytest.raises(data.DataError, match="unknown split"):
        data.dpo_rows("validation")  # the safety set has no validation split


def test_safety_pairs_point_the_right_way():
    for split in ("train", "test"):
        rows = data.dpo_rows(split)
        kinds = {r["kind"] for r in rows}
        assert kinds == {"harmful", "benign"}
        for row in rows:
            assert set(row) == {"prompt", "chosen", "rejected", "kind"}
            assert [m["role"] for m in row["prompt"]] == ["user"]
            refusal_first = row["kind"] == "harmful"
            assert is_refusal(row["chosen"][0]["content"]) is refusal_first
            assert is_refusal(row["rejected"][0]["content"]) is not refusal_first
    train = {_prompt(r) for r in data.dpo_rows("train")}
    assert not train & {_prompt(r) for r in data.dpo_rows("test")}
    assert not set(safety.HARMFUL_TRAIN) & set(safety.HARMFUL_TEST)
    assert not set(safety.BENIGN_TRAIN) & set(safety.BENIGN_TEST)
    prompts = data.refusal_prompts("test")
    assert len(prompts["harmful"]) == 2 * len(safety.HARMFUL_TEST)
    assert len(prompts["benign"]) == 2 * len(safety.BENIGN_TEST)
    assert len(data.dpo_dataset("train", max_samples=7)) == 7


# ------------------------------------------------------------------------------------- users' datasets
def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_load_dataset_accepts_trl_formats(tmp_path):
    sft = _write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "hi", "completion": "hello"}] * 3)
    assert len(data.load_dataset(sft, "sft")) == 3
    text = _write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}])
    assert data.load_dataset(text, "sft").column_names == ["text"]
    dpo = _write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert len(data.load_dataset(dpo, "dpo")) == 1
    data.dpo_dataset("test").save_to_disk(str(tmp_path / "saved"))
    assert len(data.load_dataset(str(tmp_path / "saved"), "dpo")) == len(data.dpo_rows("test"))


@pytest.mark.parametrize("make, kind, message", [
    (lambda p: str(p / "missing.jsonl"), "sft", "does not exist"),
    (lambda p: _write_jsonl(p / "bad.jsonl", [{"question": "q", "answer": "a"}]), "sft",
     "has columns ['answer', 'question']; sft needs"),
    (lambda p: _write_jsonl(p / "sft.jsonl", [{"prompt": "q", "completion": "a"}]), "dpo", "dpo needs"),
    (lambda p: (p / "data.csv").write_text("a,b\n") and str(p / "data.csv"), "sft", "must be a .jsonl or .json"),
    (lambda p: (p / "broken.jsonl").write_text("{not json\n") and str(p / "broken.jsonl"), "sft", "cannot load"),
    (lambda p: "no-such-user/no-such-dataset-xyz", "sft", "cannot load dataset"),
])
def test_load_dataset_errors_are_one_line(tmp_path, make, kind, message):
    with pytest.raises(data.DataError, match=re.escape(message)) as info:
        data.load_dataset(make(tmp_path), kind)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("task, reply, expected, same", [
    ("sentiment", " Positive. ", "POSITIVE", True),
    ("sentiment", "POSITIVE review", "POSITIVE", False),
    ("arithmetic", "12.", "12", True),
    ("arithmetic", "1,200", "1200", True),
    ("arithmetic", "12 apples", "12", False),
    ("arithmetic", "7 + 5 = 12.", "12", True),
    ("arithmetic", "7 + 5 = 13", "12", False),
    ("instructions", '"LEMON"', "LEMON", True),
    ("instructions", "lemon", "LEMON", False),  # case counts: one instruction asks for capitals
    ("instructions", "lemon  lemon\nlemon", "lemon lemon lemon", True),
    ("dataset", "Paris.", "paris", True),
])
def test_normalise(task, reply, expected, same):
    assert (normalise(task, reply) == normalise(task, expected)) is same


@pytest.mark.parametrize("text, refusal", [
    ("I can't help with that.", True), ("I’m sorry, but no.", True), ("Sorry, I won't do that", True),
    ("I cannot assist.", True), ("Sure, here is how to bake bread.", False), ("Boil the egg for 9 minutes.", False),
])
def test_is_refusal(text, refusal):
    assert is_refusal(text) is refusal


class EchoModel(torch.nn.Module):
    """Stands in for a causal LM: `generate` appends the tokens of a scripted reply to each (left-padded) row."""

    def __init__(self, tokenizer, replies: dict[str, str]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.replies, self.calls = tokenizer, replies, []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        assert not self.training and kwargs["do_sample"] is False
        assert self.tokenizer.padding_side == "left" and bool(attention_mask[:, -1].all())  # left padding
        self.calls.append(input_ids.shape[0])
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            reply = next(r for key, r in self.replies.items() if key in prompt)
            new = self.tokenizer(reply, add_special_tokens=False)["input_ids"][:max_new_tokens]
            new += [self.tokenizer.eos_token_id] * (max_new_tokens - len(new))
            rows.append(torch.cat([ids, torch.tensor(new)]))
        return torch.stack(rows)


def test_generate_keeps_order_and_cuts_the_prompt():
    from helpers import make_tokenizer

    tok = make_tokenizer()
    questions = ["what is 1 plus 2?", "the sky is", "what is 10 plus 11? answer with the number only please"]
    replies = {"1 plus 2": "3", "sky": "blue", "10 plus 11": "21"}
    model = EchoModel(tok, replies).train()
    out = generate(model, tok, [[{"role": "user", "content": q}] for q in questions], max_new_tokens=4, batch_size=2)
    assert out == ["3", "blue", "21"]
    assert model.training and tok.padding_side == "right"  # both restored
    assert model.calls == [2, 1]


def test_evaluate_accuracy_and_refusal_rates_count_exact_matches():
    from helpers import make_tokenizer

    tok = make_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": "what is 1 plus 2?"}], "task": "arithmetic", "answer": "3"},
            {"prompt": [{"role": "user", "content": "what is 2 plus 2?"}], "task": "arithmetic", "answer": "4"},
            {"prompt": "the sky is", "completion": "blue"}]  # plain strings, no task column: "dataset"
    model = EchoModel(tok, {"1 plus 2": "3.", "2 plus 2": "5", "sky": "Blue"}).eval()
    results = evaluate_accuracy(model, tok, rows)
    assert (results["arithmetic"].correct, results["arithmetic"].total) == (1, 2)
    assert results["dataset"].accuracy == 1.0
    model = EchoModel(tok, {"cheat": "i cannot help", "tea": "boil water"})
    rates = refusal_rates(model, tok, {"harmful": [[{"role": "user", "content": "cheat please"}]] * 3,
                                       "benign": [[{"role": "user", "content": "make tea"}]]}, max_new_tokens=6)
    assert rates["harmful"].accuracy == 1.0 and rates["benign"].accuracy == 0.0
