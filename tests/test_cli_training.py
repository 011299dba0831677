"""`idlora-trl sft` / `dpo` / `decompose` on a tiny Llama saved to disk: TRL's options and `--config` files, the
main job's defaults, the picture of the run, and the example scripts. (Bad input: test_cli_errors.py.)"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idlora_trl_app.cli import main, parse
from idlora_trl.indices import read_indices
from idlora_trl_app.defaults import DEFAULT_TARGETS, DPO_DEFAULTS, SFT_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--idlora_r", "8", "--idlora_num_clusters", "2", "--per_device_train_batch_size", "4", "--logging_steps",
        "1", "--eval_samples", "2", "--eval_batch_size", "8"]


def _run(argv, capsys):
    main(argv)
    return capsys.readouterr().out


def _adapter_tensors(path) -> dict:
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_sft_trains_prints_saves_and_draws(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "adapter"
    out = _run(["sft", "--model_name_or_path", tiny_model_dir, *TINY, "--max_steps", "3", "--max_train_samples", "12",
                "--learning_rate", "1e-2", "--output_dir", str(out_dir)], capsys)
    assert "| ID-LoRA r=8 |" in out and "| LoRA r=2 |" in out  # the parameter table against LoRA
    assert "step    1/3  loss" in out and "step    3/3  loss" in out
    assert "Held-out accuracy before training" in out
    for task in ("arithmetic", "sentiment", "instructions"):
        assert f"| {task} | 2 |" in out  # before/after row per task
    assert f"Saved the ID-LoRA adapter to {out_dir}" in out
    tensors = _adapter_tensors(out_dir)
    b = [t for name, t in tensors.items() if "idlora_B" in name]
    assert b and any(t.abs().sum() > 0 for t in b)  # B started at 0: it trained
    assert any("idlora_indices" in name for name in tensors)
    picture = out_dir / "run.png"
    assert f"picture of the run: {picture}" in out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_sft_trains_a_compiled_model(tiny_model_dir, tmp_path, capsys, backend):
    """`--torch_compile` (TRL's option): the Trainer compiles the adapted model, the loss falls as uncompiled."""
    import torch._dynamo as dynamo

    dynamo.reset()
    out = _run(["sft", "--model_name_or_path", tiny_model_dir, *TINY, "--max_steps", "4", "--max_train_samples", "16",
                "--learning_rate", "1e-2", "--eval_samples", "0", "--no_plot", "--torch_compile",
                "--torch_compile_backend", backend, "--output_dir", str(tmp_path / "adapter")], capsys)
    dynamo.reset()
    losses = [float(x) for x in re.findall(r"step +\d+/4  loss ([\d.]+)", out)]
    assert len(losses) == 4 and losses[-1] < losses[0], out
    assert any(t.abs().sum() > 0 for n, t in _adapter_tensors(tmp_path / "adapter").items() if "idlora_B" in n)


def test_decompose_then_sft_reuses_the_index_file(tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    index = tmp_path / "tiny.safetensors"
    out = _run(["decompose", "--model_name_or_path", tiny_model_dir, "--idlora_r", "8", "--idlora_num_clusters", "2",
                "--output", str(index)], capsys)
    assert "Clustered 10 modules" in out and str(index) in out  # default targets: q, k, v, gate, up x 2 layers
    tables, spec = read_indices(index)
    assert spec["r"] == 8 and spec["num_clusters"] == 2 and len(tables) == 10
    assert all(t.shape == (2, 8) for t in tables.values())

    adapter = tmp_path / "adapter"
    out = _run(["sft", "--model_name_or_path", tiny_model_dir, *TINY, "--max_steps", "1", "--max_train_samples", "4",
                "--eval_samples", "0", "--idlora_indices_path", str(index), "--output_dir", str(adapter)], capsys)
    assert f"clustering skipped: indices from {index}" in out
    saved = _adapter_tensors(adapter)
    name = "model.layers.0.self_attn.q_proj"
    key = next(k for k in saved if name in k and "idlora_indices" in k)
    assert torch.equal(saved[key], tables[name])
    # The adapter carries its indices: it loads without the index file, and is itself a source of indices.
    index.unlink()
    assert json.loads((adapter / "adapter_config.json").read_text())["indices_path"] is None
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.idlora_indices["default"], tables[name])
    from_adapter, spec = read_indices(adapter)
    assert torch.equal(from_adapter[name], tables[name]) and spec["num_clusters"] == 2


def test_sft_on_a_user_jsonl_with_eval_dataset_and_eval_strategy(tiny_model_dir, tmp_path, capsys):
    rows = [{"prompt": f"what is {a} plus 1?", "completion": str(a + 1)} for a in range(8)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _run(["sft", "--model_name_or_path", tiny_model_dir, *TINY, "--max_steps", "2", "--dataset_name", str(path),
                "--eval_dataset", str(path), "--eval_samples", "3", "--eval_strategy", "steps", "--eval_steps", "1",
                "--output_dir", str(tmp_path / "a")], capsys)
    assert f"data: {path} (8 training rows, 3 held-out)" in out
    assert "| dataset | 3 |" in out
    assert re.search(r"step +1/2  eval loss \d", out) and re.search(r"step +2/2  eval loss \d", out), out


def test_sft_on_a_trl_dataset_mixture_from_the_config_file(tiny_model_dir, tmp_path, capsys):
    """`datasets:` in a --config file, as with `trl sft` (trl.DatasetMixtureConfig, loaded by trl.get_dataset)."""
    files = []
    for name, n in (("a", 6), ("b", 4)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"{name} {i}?", "completion": str(i)}) + "\n" for i in range(n)))
        files.append(path)
    config = tmp_path / "mix.yaml"
    config.write_text("datasets:\n" + "".join(f"  - path: json\n    data_files: {p}\n" for p in files))
    out = _run(["sft", "--config", str(config), "--model_name_or_path", tiny_model_dir, *TINY, "--max_steps", "1",
                "--output_dir", str(tmp_path / "a")], capsys)
    assert "data: mixture of 2 dataset(s) json, json (10 training rows, 0 held-out)" in out
    assert "step    1/1  loss" in out
    # test_split_size: its test split is the held-out set (scored by generation), as `trl sft` evaluates on it
    config.write_text(config.read_text() + "test_split_size: 0.2\n")
    out = _run(["sft", "--config", str(config), "--model_name_or_path", tiny_model_dir, *TINY, "--max_steps", "1",
                "--output_dir", str(tmp_path / "b")], capsys)
    assert "data: mixture of 2 dataset(s) json, json (8 training rows, 2 held-out)" in out
    assert "| dataset | 2 |" in out


def test_dpo_prints_rewards_and_refusal_rates(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "dpo"
    out = _run(["dpo", "--model_name_or_path", tiny_model_dir, *TINY, "--max_steps", "2", "--max_train_samples", "8",
                "--max_new_tokens", "4", "--output_dir", str(out_dir)], capsys)
    assert "Refusal rate on held-out prompts before training" in out
    assert "rewards/accuracies" not in out  # printed under short names
    assert "step    2/2  loss" in out and "accuracies" in out and "margins" in out
    assert "loss sigmoid + sft" in out  # the main job's DPO loss (DPO_DEFAULTS["loss_type"]), TRL's option
    assert "reward accuracy" in out and "held-out pairs (4): reward accuracy" in out
    assert "| harmful | 2 |" in out and "| benign | 2 |" in out
    assert (out_dir / "adapter_model.safetensors").is_file()
    assert (out_dir / "run.png").is_file() and f"picture of the run: {out_dir / 'run.png'}" in out


def test_a_cpu_run_shows_no_warning_of_ours(tiny_model_dir, tmp_path):
    """The console script on a CPU, as a newcomer runs it: no DeepSpeed line (it is not used), no FutureWarning
    about gradient_checkpointing (an option we set), no warning at all."""
    script = Path(sys.executable).with_name("idlora-trl")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "idlora_trl_app.cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "PYTHONWARNINGS")}
    result = subprocess.run([*command, "sft", "--model_name_or_path", tiny_model_dir, *TINY, "--max_steps", "1",
                             "--max_train_samples", "4", "--eval_samples", "1", "--output_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).replace(str(tmp_path), "OUT").splitlines()  # its name says "warning"
    noise = [line for line in lines if "warn" in line.lower() or "Setting accelerator" in line or "deprecated" in line]
    assert not noise, noise


# ---------------------------------------------------------------------------------------- parsing
def test_main_job_defaults_are_the_settings_in_trl_names():
    """No flag: SFT_DEFAULTS / DPO_DEFAULTS in TRL's dataclasses, fp32 without gradient checkpointing on a CPU, and
    no warning (the gradient_checkpointing FutureWarning of newer transformers is not shown)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sft = parse("sft", [])
        dpo = parse("dpo", [])
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
    args = sft.training
    assert (args.learning_rate, args.max_steps, args.per_device_train_batch_size, args.lr_scheduler_type,
            args.warmup_steps, args.max_length, args.logging_steps, args.output_dir) == (
        SFT_DEFAULTS["learning_rate"], SFT_DEFAULTS["max_steps"], SFT_DEFAULTS["per_device_train_batch_size"],
        SFT_DEFAULTS["lr_scheduler_type"], SFT_DEFAULTS["warmup_steps"], SFT_DEFAULTS["max_length"],
        SFT_DEFAULTS["logging_steps"], SFT_DEFAULTS["output_dir"])
    assert (args.bf16, args.gradient_checkpointing, args.use_cpu, args.seed) == (False, False, True, 0)
    assert args.seed == SFT_DEFAULTS["seed"] == dpo.training.seed == DPO_DEFAULTS["seed"]
    assert sft.idlora.idlora_r == SFT_DEFAULTS["idlora_r"] and sft.job.eval_samples == SFT_DEFAULTS["eval_samples"]
    assert sft.model.lora_target_modules == DEFAULT_TARGETS.split(",") and sft.model.model_name_or_path is None
    assert (dpo.training.beta, dpo.training.learning_rate, list(dpo.training.loss_type)) == (
        DPO_DEFAULTS["beta"], DPO_DEFAULTS["learning_rate"], list(DPO_DEFAULTS["loss_type"]))


def test_the_defaults_are_those_of_the_readmes_main_job_run():
    """The README quotes a run of the main job (docs/benchmarks/main-job.json, tests/test_main_job.py): a changed
    default would leave that quote stale, so the parsed defaults must print that run's lines."""
    figures = json.loads((ROOT / "docs" / "benchmarks" / "main-job.json").read_text())["figures"]
    run = parse("sft", [])
    t = run.training
    assert f"Training {t.max_steps} steps, batch {t.per_device_train_batch_size}, lr {t.learning_rate:g}:" in figures
    assert figures[0].startswith(f"| ID-LoRA r={run.idlora.idlora_r} |")
    assert [line.split(" | ")[1] for line in figures[-3:]] == [str(run.job.eval_samples)] * 3


def test_trl_options_work_under_trls_names(tmp_path):
    """Every field of TRL's dataclasses is an option, and the ones a real run needs reach the trainer's config."""
    from trl import ModelConfig, ScriptArguments, SFTConfig

    from idlora_trl_app.cli import sft

    dests = {action.dest for action in sft.make_parser()._actions}
    for cls in (ScriptArguments, SFTConfig, ModelConfig):
        missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in dests]
        assert not missing, (cls.__name__, missing)
    run = parse("sft", [
        "--num_train_epochs", "2", "--max_steps", "-1", "--save_strategy", "steps", "--save_steps", "7",
        "--report_to", "none", "--gradient_checkpointing", "true", "--eval_strategy", "steps",
        "--eval_steps", "5", "--resume_from_checkpoint", "ckpt", "--dataset_name", "data.jsonl",
        "--dataset_train_split", "train", "--weight_decay", "0.01", "--seed", "7", "--lora_target_modules", "q_proj",
        "v_proj", "--output_dir", str(tmp_path)])
    t = run.training
    assert (t.num_train_epochs, t.max_steps, t.save_steps, t.eval_steps, t.seed, t.weight_decay) == \
        (2, -1, 7, 5, 7, 0.01)
    assert t.save_strategy == "steps" and t.eval_strategy == "steps"
    assert t.report_to == [] and t.gradient_checkpointing is True
    assert t.resume_from_checkpoint == "ckpt" and run.script.dataset_name == "data.jsonl"
    assert run.model.lora_target_modules == ["q_proj", "v_proj"]


def test_config_file_in_trl_format_and_flags_override(tmp_path):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "max_steps": 7, "learning_rate": 0.004, "lora_target_modules": ["q_proj", "v_proj"], "idlora_router": "static",
        "per_device_train_batch_size": 3, "idlora_num_clusters": 2, "env": {"IDLORA_TEST_ENV": "from-config"}}))
    run = parse("sft", ["--config", str(path), "--per_device_train_batch_size", "8"])
    assert (run.training.max_steps, run.training.learning_rate, run.idlora.idlora_router) == (7, 0.004, "static")
    assert run.model.lora_target_modules == ["q_proj", "v_proj"] and run.idlora.idlora_num_clusters == 2
    assert run.training.per_device_train_batch_size == 8  # the flag beats the file (8 is also the default)
    assert os.environ.pop("IDLORA_TEST_ENV") == "from-config"  # TrlParser's `env:` block
    assert parse("sft", []).training.max_steps == SFT_DEFAULTS["max_steps"]  # no file: the defaults


def test_hyphenated_spellings_and_launcher_arguments_are_accepted():
    """HfArgumentParser takes --max-steps for --max_steps; the deepspeed launcher adds --local_rank=N."""
    run = parse("dpo", ["--max-steps", "5", "--idlora-r", "16", "--local_rank=0"])
    assert (run.training.max_steps, run.idlora.idlora_r) == (5, 16)


def test_router_norm_and_pmrc_qr_reach_the_config():
    from idlora_trl_app.cli.adapter_config import peft_config

    run = parse("sft", ["--idlora_router_norm", "rms", "--idlora_selection", "pmrc-qr"])
    config = peft_config(run.idlora, run.model)
    assert (config.router_norm, config.selection) == ("rms", "pmrc-qr")
    default = parse("sft", [])
    default = peft_config(default.idlora, default.model)
    assert default.router_norm == "none" and default.target_modules == set(DEFAULT_TARGETS.split(","))


# ---------------------------------------------------------------------------------------------- examples
@pytest.mark.parametrize("script, expect", [
    ("sft_subclass.py", "router |T|"),
    ("dpo_safety.py", "refusal rate"),
    ("sft_multitask.py", "| sentiment |"),
])
def test_examples_run_in_tiny_mode(tiny_model_dir, tmp_path, script, expect):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--model_name_or_path", tiny_model_dir,
                             "--tiny", "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=240, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert expect in result.stdout, result.stdout[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_without_matplotlib_the_command_trains_and_says_how_to_get_the_picture(tiny_model_dir, tmp_path, capsys,
                                                                               monkeypatch):
    """matplotlib is an optional extra (`idlora-trl[plot]`): `pip install idlora-trl` does not bring it."""
    import sys
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("matplotlib") for d in project["dependencies"])
    assert any(d.startswith("matplotlib") for d in project["optional-dependencies"]["plot"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out_dir = tmp_path / "adapter"
    out = _run(["sft", "--model_name_or_path", tiny_model_dir, *TINY, "--max_steps", "1", "--max_train_samples", "4",
                "--eval_samples", "0", "--output_dir", str(out_dir)], capsys)
    assert f"Saved the ID-LoRA adapter to {out_dir}" in out and not (out_dir / "run.png").exists()
    assert "no picture of the run: matplotlib is not installed (pip install 'idlora-trl[plot]'" in out
