"""`idlora-trl sft` / `dpo --deepspeed zero3_cpu_fp32.json` under `torchrun --nproc_per_node 2` (CPU, gloo).

The command builds the trainer's arguments before the model, so the model loads partitioned (zero.Init), the
decomposition gathers each weight, both ranks end with the same indices, only rank 0 prints, generation-based
evaluation is skipped with a message, and the saved adapter loads in one process.
"""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path

import pytest
from launch import indices_hash, torchrun
from peft import PeftModel
from transformers import AutoModelForCausalLM

from idlora_trl import get_indices

CPU_CONFIG = str(files("idlora_trl.integrations.deepspeed") / "zero3_cpu_fp32.json")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from helpers import make_chat_llama, make_tokenizer

    path = tmp_path_factory.mktemp("tiny-chat-llama")
    tokenizer = make_tokenizer()
    make_chat_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_cli_with_deepspeed_zero3_on_two_ranks(tiny_model_dir, tmp_path, command):
    adapter = tmp_path / "adapter"
    launch = torchrun("cli.py", str(tmp_path), command, "--deepspeed", CPU_CONFIG, "--model", str(tiny_model_dir),
                      "--idlora-r", "8", "--num-clusters", "2", "--target-modules", "all-linear", "--max-steps", "4",
                      "--batch-size", "4", "--max-train-samples", "32", "--eval-samples", "2",
                      "--logging-steps", "1", "--learning-rate", "1e-2", "--output-dir", str(adapter),
                      log=tmp_path / "run")
    assert launch.returncode == 0, launch.tail()
    log = launch.log
    ranks = [json.loads((tmp_path / f"cli_rank{r}.json").read_text()) for r in (0, 1)]

    # Partitioned on load: every weight was gathered by the DeepSpeed plugin, and was whole inside its context.
    for facts in ranks:
        contexts = facts["weight_contexts"]
        assert len(contexts) == 14  # 2 layers x 7 projections, entered on every rank
        assert {c["context"] for c in contexts} == {"GatheredParameters"}
        assert all(c["shape_inside"] == c["full_shape"] for c in contexts)
        assert facts["process_group_left"]
    assert ranks[0]["indices_hashes"] == ranks[1]["indices_hashes"] and len(ranks[0]["indices_hashes"]) == 1

    # Rank 0 alone prints; the whole model's size is reported, not a rank's shard.
    expected = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert log.count("== Summary ==") == 1
    assert f"({expected:,} parameters)" in log
    assert "Held-out evaluation by generation skipped under --deepspeed" in log
    assert re.search(r"step +4/4  loss", log)
    if command == "dpo":
        assert "held-out pairs (4): reward accuracy" in log  # trainer.evaluate() runs under ZeRO-3

    # The adapter (gathered on save) loads in one process with the ranks' indices.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    assert indices_hash(get_indices(model)) == ranks[0]["indices_hashes"][0]
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "idlora_B" in n)  # it trained
