"""The DPO protocol (benchmarks/dpo): its held-out split, its rewards against a dense reference, a smoke run."""
from __future__ import annotations

import copy
import math
import re
import subprocess
import sys

import torch

from benchmarks.common import ROOT, tiny_llama, tiny_tokenizer
from benchmarks.dpo.runs import preference_scores, splits


def test_validation_requests_are_held_out_of_training():
    data = splits()
    prompt = lambda row: row["prompt"][0]["content"]  # noqa: E731
    train, validation = {prompt(r) for r in data["train"]}, {prompt(r) for r in data["validation"]}
    assert validation and not train & validation and not (train | validation) & {prompt(r) for r in data["test"]}
    from idlora_trl_app.data.safety import BENIGN_TRAIN, HARMFUL_TRAIN

    held = HARMFUL_TRAIN[-6:] + list(BENIGN_TRAIN)[-6:]
    assert all(any(act in p for act in held) for p in validation)
    assert not any(act in p for p in train for act in held)
    assert {r["kind"] for r in data["validation"]} == {"harmful", "benign"}


def _logp(model, tokenizer, prompt: list[dict], completion: list[dict]) -> float:
    """Sum of log p(completion token) under `model`, written out: the template's text, its tokens, a softmax."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    answer_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)[len(prompt_text):].rstrip()
    p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + a_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(p_ids) + j - 1, t]) for j, t in enumerate(a_ids))


def test_rewards_margin_accuracy_and_loss_match_a_dense_reference():
    from peft import LoraConfig, get_peft_model

    pairs = splits()["test"][:6]
    tokenizer = tiny_tokenizer([m["content"] for r in pairs for k in ("prompt", "chosen", "rejected") for m in r[k]])
    base = tiny_llama(vocab=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id).eval()
    reference = copy.deepcopy(base)  # the base, never wrapped: independent of disable_adapter
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    beta = 0.5
    margins = []
    for pair in pairs:
        reward = {side: beta * (_logp(model, tokenizer, pair["prompt"], pair[side])
                                - _logp(reference, tokenizer, pair["prompt"], pair[side]))
                  for side in ("chosen", "rejected")}
        margins.append(reward["chosen"] - reward["rejected"])
    scores = preference_scores(model, tokenizer, pairs, beta)
    assert any(m > 0 for m in margins) and any(m < 0 for m in margins)  # both branches of the accuracy
    assert math.isclose(scores["margin"], sum(margins) / len(margins), rel_tol=1e-4, abs_tol=1e-6)
    assert scores["accuracy"] == sum(m > 0 for m in margins) / len(margins)
    loss = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / len(margins)
    assert math.isclose(scores["loss"], loss, rel_tol=1e-4)


def test_smoke_run_chooses_a_rate_and_scores_the_test_seeds(tmp_path):
    out = tmp_path / "dpo.md"
    result = subprocess.run([sys.executable, "-m", "benchmarks.dpo", "--smoke", "--threads", "1", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = out.read_text()
    for method in ("LoRA", "ID-LoRA (paper)"):
        assert f"| {method} | 0.00" in doc and doc.count(f"| {method} |") == 2, doc  # the table and the grid
    assert (tmp_path / "dpo.json").is_file() and "refuses harmful" in doc
    assert re.search(r"\| base model \(no adapter\) \| — \| 0 \| — \| — \| \d\.\d{3} \| \d\.\d{3} \|", doc)
