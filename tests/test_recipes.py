"""The TRL-style recipes of examples/recipes/ parse as `idlora-trl` configs and say what they claim, and no option
of `idlora-trl sft` / `dpo` is taken by a launcher (torchrun, deepspeed, accelerate launch) for one of its own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch import free_port

from idlora_trl_app.cli import command_module, parse
from idlora_trl_app.cli.adapter_config import peft_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples" / "recipes"
ALL_SEVEN = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_every_recipe_is_tested():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == [
        "dpo_safety.yaml", "sft_llama32_3b_table3.yaml", "sft_zero3_multi_gpu.yaml"]


def test_table_3_recipe_is_the_papers_setting(capsys):
    """Llama-3.2-3B, r=128, k=4, all seven projections: on the meta device, 0.77% trained against LoRA r=32's 1.49%."""
    from peft import get_peft_model

    from idlora_trl.counting import count_parameters, format_parameter_table, meta_model

    run = parse("sft", ["--config", str(RECIPES / "sft_llama32_3b_table3.yaml")])
    config = peft_config(run.idlora, run.model)
    assert (config.r, config.num_clusters, config.rank_boost, set(config.target_modules)) == (128, 4, 2, ALL_SEVEN)
    assert run.model.model_name_or_path == "meta-llama/Llama-3.2-3B" and run.training.bf16
    assert run.training.save_steps == 500 and run.training.save_total_limit == 3
    table = format_parameter_table(count_parameters(get_peft_model(meta_model("llama-3.2-3b"), config),
                                                    lora_r=run.model.lora_r))
    assert "| ID-LoRA r=128 | 24,797,696 | 0.77% |" in table and "| LoRA r=32 | 48,627,712 | 1.49% |" in table


def test_safety_dpo_recipe():
    run = parse("dpo", ["--config", str(RECIPES / "dpo_safety.yaml")])
    t = run.training
    assert (t.beta, list(t.loss_type), t.num_train_epochs, t.max_steps) == (0.1, ["sigmoid", "sft"], 2, -1)
    assert run.script.dataset_name.endswith(".jsonl") and run.job.eval_dataset.endswith(".jsonl")
    assert peft_config(run.idlora, run.model).r == 32


def test_zero3_recipe_builds_its_deepspeed_config():
    """Parsed in a process of its own: building SFTConfig with `deepspeed:` starts the process group (a world of one
    here) and switches zero.Init on, as the recipe needs under torchrun."""
    code = (
        "import importlib, json, sys\n"
        "importlib.import_module('deepspeed.comm.torch').build_shm_op = lambda: None\n"
        "from transformers.integrations import is_deepspeed_zero3_enabled\n"
        "from idlora_trl_app.cli import parse\n"
        "run = parse('sft', ['--config', sys.argv[1]])\n"
        "t = run.training\n"
        "print(json.dumps(dict(zero3=is_deepspeed_zero3_enabled(), deepspeed=t.deepspeed, bf16=t.bf16,\n"
        "    stage=t.hf_deepspeed_config.config['zero_optimization']['stage'], save_steps=t.save_steps,\n"
        "    r=run.idlora.idlora_r, eval_samples=run.job.eval_samples)))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)
    result = subprocess.run([sys.executable, "-c", code, str(RECIPES / "sft_zero3_multi_gpu.yaml")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts == dict(zero3=True, deepspeed="integrations/deepspeed/zero3_bf16.json", bf16=True, stage=3,
                         save_steps=250, r=64, eval_samples=0)


# ------------------------------------------------------------------------------------------ launchers
def every_option(command: str) -> list[str]:
    """Each long option of `idlora-trl COMMAND` followed by a value, as a launcher would see them."""
    actions = command_module(command).make_parser()._actions
    options = [s for a in actions for s in a.option_strings if s.startswith("--")]
    return [item for option in options if option != "--help" for item in (option, "1")]


def launcher_parsers():
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    return {
        "torchrun": (get_args_parser(), ["--nproc_per_node", "2", "--no-python", "idlora-trl"]),
        "accelerate launch": (launch_command_parser(), ["--num_processes", "2", "-m", "idlora_trl_app.cli"]),
    }


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_launchers_pass_every_option_through(command):
    for name, (parser, head) in launcher_parsers().items():
        argv = [command, *every_option(command)]
        args = parser.parse_args([*head, *argv])
        assert args.training_script_args == argv, name


def test_the_launcher_check_can_fail():
    """The bare --r that torchrun took for its own --rdzv_*/--role options (the reason for --idlora_r)."""
    parser, head = launcher_parsers()["torchrun"]
    with pytest.raises(SystemExit):
        parser.parse_args([*head, "sft", "--r", "8"])
