"""`idlora-trl sft` / `dpo --deepspeed zero3_cpu_fp32.json` under `torchrun --nproc_per_node 2` (CPU, gloo), a
resumed run, and `accelerate launch` with the ZeRO-3 accelerate config of integrations/deepspeed/.

The command builds the trainer's arguments before the model, so the model loads partitioned (zero.Init), the
decomposition gathers each weight, both ranks end with the same indices, only rank 0 prints, generation-based
evaluation is skipped with a message, and the saved adapter loads in one process. `--save_steps 2` writes a
checkpoint; `--resume_from_checkpoint` continues from it without clustering (nothing is gathered) and ends with the
uninterrupted run's adapter.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from launch import free_port, indices_hash, torchrun
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from idlora_trl import get_indices

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 600  # seconds per launch: 30-60 s on 2 cores, minutes when they are shared with other jobs
CPU_CONFIG = str(files("idlora_trl.integrations.deepspeed") / "zero3_cpu_fp32.json")
TRAIN = ["--idlora_r", "8", "--idlora_num_clusters", "2", "--lora_target_modules", "all-linear", "--max_steps", "4",
         "--per_device_train_batch_size", "4", "--max_train_samples", "32", "--eval_samples", "2",
         "--logging_steps", "1", "--learning_rate", "1e-2"]


def rank_facts(out: Path) -> list[dict]:
    return [json.loads((out / f"cli_rank{r}.json").read_text()) for r in (0, 1)]


def launch_cli(out: Path, model_dir: str, command: str, *extra: str):
    return torchrun("cli.py", str(out), command, "--deepspeed", CPU_CONFIG, "--model_name_or_path", model_dir, *TRAIN,
                    *extra, log=out / "run", timeout=LIMIT)


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero3-cli-sft")
    launch = launch_cli(out, tiny_model_dir, "sft", "--output_dir", str(out / "adapter"), "--save_steps", "2")
    assert launch.returncode == 0, launch.tail()
    (out / "log.txt").write_text(launch.log)
    return out


def check_run(out: Path, log: str, model_dir: str, command: str) -> None:
    ranks = rank_facts(out)
    # Partitioned on load: every weight was gathered by the DeepSpeed plugin to the rank that clusters it, whole.
    for facts in ranks:
        contexts = facts["weight_contexts"]
        assert len(contexts) == 14  # 2 layers x 7 projections, entered on every rank
        assert {c["context"] for c in contexts} == {"GatherToOwner"}
        assert all(c["returned"] == (c["full_shape"] if c["owner"] == facts["rank"] else None) for c in contexts)
        assert all(c["shape_inside"] == [0] for c in contexts)
        assert facts["process_group_left"]
    assert ranks[0]["indices_hashes"] == ranks[1]["indices_hashes"] and len(ranks[0]["indices_hashes"]) == 1

    # Rank 0 alone prints; the whole model's size is reported, not a rank's shard.
    expected = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    assert log.count("== Summary ==") == 1
    assert f"({expected:,} parameters)" in log
    assert "Held-out evaluation by generation skipped under DeepSpeed ZeRO-3" in log
    assert re.search(r"step +4/4  loss", log)
    if command == "dpo":
        assert "held-out pairs (4): reward accuracy" in log  # trainer.evaluate() runs under ZeRO-3

    # The adapter (gathered on save) loads in one process with the ranks' indices.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out / "adapter"))
    assert indices_hash(get_indices(model)) == ranks[0]["indices_hashes"][0]
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "idlora_B" in n)  # it trained


def test_sft_with_deepspeed_zero3_on_two_ranks(sft_run, tiny_model_dir):
    check_run(sft_run, (sft_run / "log.txt").read_text(), tiny_model_dir, "sft")
    checkpoint = sft_run / "adapter" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()  # --save_steps 2: the adapter, its indices inside
    assert any(key.endswith(".idlora_indices") for key in load_file(checkpoint / "adapter_model.safetensors"))
    assert (checkpoint / "global_step2").is_dir()  # DeepSpeed's own state (optimizer partitions)


def test_dpo_with_deepspeed_zero3_on_two_ranks(tiny_model_dir, tmp_path):
    launch = launch_cli(tmp_path, tiny_model_dir, "dpo", "--output_dir", str(tmp_path / "adapter"))
    assert launch.returncode == 0, launch.tail()
    check_run(tmp_path, launch.log, tiny_model_dir, "dpo")


def test_resume_on_two_ranks_does_not_cluster_and_ends_with_the_same_adapter(sft_run, tiny_model_dir, tmp_path):
    checkpoint = sft_run / "adapter" / "checkpoint-2"
    launch = launch_cli(tmp_path, tiny_model_dir, "sft", "--output_dir", str(tmp_path / "adapter"),
                        "--resume_from_checkpoint", str(checkpoint))
    assert launch.returncode == 0, launch.tail()
    assert f"clustering skipped: indices from the checkpoint {checkpoint}" in launch.log
    resumed, uninterrupted = rank_facts(tmp_path), rank_facts(sft_run)
    assert all(facts["weight_contexts"] == [] for facts in resumed)  # no weight gathered: no clustering at all
    assert resumed[0]["indices_hashes"] == uninterrupted[0]["indices_hashes"]
    assert re.search(r"step +3/4  loss", launch.log) and not re.search(r"step +2/4  loss", launch.log)
    final = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    expected = load_file(sft_run / "adapter" / "adapter_model.safetensors")
    assert final.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-5, atol=1e-6)


def test_accelerate_launch_with_the_zero3_accelerate_config(tiny_model_dir, tmp_path):
    """`accelerate launch --config_file integrations/deepspeed/accelerate_zero3_cpu.yaml ... sft`: 2 processes,
    DeepSpeed ZeRO-3 from accelerate's environment (no --deepspeed option); the model loads partitioned."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               "integrations/deepspeed/accelerate_zero3_cpu.yaml", "--main_process_port", str(free_port()),
               str(ROOT / "tests" / "distributed" / "cli.py"), str(tmp_path),  # idlora_trl_app.cli.main, observed
               "sft", "--model_name_or_path", tiny_model_dir, *TRAIN, "--output_dir", str(tmp_path / "adapter")]
    result = subprocess.run(["timeout", "-k", "15", str(LIMIT), *command], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    check_run(tmp_path, log, tiny_model_dir, "sft")
