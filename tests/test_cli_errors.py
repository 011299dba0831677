"""Bad input to `idlora-trl`: one line on stderr that names the option (or file, or column) and the fix, exit status
2, never a traceback. Unknown options, wrong types, missing files, bad columns, bad ID-LoRA values, LoRA-only
options, checkpoints that are not, and settings that do not fit the model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from idlora_trl_app.cli import main


def expect_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"idlora-trl {argv[0]}: error: ") or argv[0] not in ("sft", "dpo", "count"), err
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    # unknown options (the old flag names among them), with a suggestion
    (["sft", "--max-step", "3"], "unknown option --max-step (did you mean --max_steps?)"),
    (["sft", "--batch-size", "4"], "unknown option --batch-size"),
    (["dpo", "--idlora_rank", "8"], "unknown option --idlora_rank (did you mean --idlora_r"),
    (["sft", "--r", "8"], "unknown option --r"),
    # wrong types and values
    (["sft", "--max_steps", "abc"], "argument --max_steps/--max-steps: invalid int value: 'abc'"),
    (["sft", "--learning_rate", "fast"], "argument --learning_rate/--learning-rate: invalid float value: 'fast'"),
    (["sft", "--learning_rate", "-1"], "--learning_rate must be a positive number, got -1.0"),
    (["sft", "--max_steps", "0"], "--max_steps must be a positive integer (or -1"),
    (["dpo", "--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a positive integer"),
    (["dpo", "--beta", "0"], "--beta must be a positive number"),
    (["sft", "--eval_samples", "-1"], "--eval_samples must be a non-negative integer"),
    (["sft", "--save_strategy", "sometimes"], "argument --save_strategy/--save-strategy: invalid choice: 'sometimes'"),
    # bad ID-LoRA values: the option, then the config's own message with the fix
    (["sft", "--idlora_router", "softmax"], "argument --idlora_router/--idlora-router: invalid choice: 'softmax'"),
    (["sft", "--idlora_dropout", "1.5"], "--idlora_dropout: IDLoRAConfig: invalid idlora_dropout=1.5"),
    (["sft", "--idlora_r", "6", "--idlora_rank_boost", "4"], "--idlora_r: IDLoRAConfig: invalid r=6. r must be"),
    (["dpo", "--idlora_min_cluster_size", "4"], "--idlora_min_cluster_size: IDLoRAConfig: invalid min_cluster_size=4"),
    (["sft", "--idlora_selection", "pmcr"], "--idlora_selection: IDLoRAConfig: invalid selection='pmcr'. Did you mean"),
    (["sft", "--idlora_selection", "no-such-plugin"], "no installed plugin implements 'no-such-plugin'"),
    (["sft", "--idlora_init_router_std", "0"], "--idlora_init_router_std: IDLoRAConfig: invalid init_router_std"),
    # LoRA-only options of TRL's ModelConfig
    (["sft", "--use_dora"], "--use_dora is a LoRA option"),
    (["sft", "--lora_alpha", "16"], "--lora_alpha is a LoRA option: ID-LoRA's scaling numerator is --idlora_alpha"),
    (["dpo", "--use_rslora", "true"], "--use_rslora is a LoRA option"),
    (["sft", "--load_in_4bit", "--load_in_8bit"], "You can't use 8 bit and 4 bit precision at the same time"),
    (["sft", "--lora_task_type", "SEQ_CLS"], "--lora_task_type: idlora-trl trains causal language models"),
    (["sft", "--lora_target_modules", ","], "--lora_target_modules is empty"),
    (["sft", "--report_to", "tensorboard"], "--report_to tensorboard needs TensorBoard: pip install tensorboard"),
    # data
    (["sft", "--tasks", "poetry"], "--tasks: unknown built-in task(s) ['poetry']"),
    (["sft", "--eval_strategy", "steps", "--eval_samples", "0"], "--eval_strategy needs held-out rows"),
    # commands
    (["train"], "invalid choice: 'train'"),
    (["decompose", "--idlora_indices_path", "x.safetensors"], "decompose writes one (--output)"),
])
def test_bad_options(argv, message, capsys):
    expect_usage_error(argv, message, capsys)


@pytest.mark.parametrize("content, message", [
    ("max_steps: 3\nno_such_key: 1\n", "unknown key 'no_such_key' in the --config file"),
    ("max_step: 3\n", "unknown key 'max_step' (did you mean 'max_steps'?)"),
    ("max_steps: abc\n", "argument --max_steps/--max-steps: invalid int value: 'abc'"),
    ("learning_rate: -1\n", "--learning_rate must be a positive number"),
    ("idlora_router: softmax\n", "--idlora_router: IDLoRAConfig: invalid router='softmax'. Choose one of"),
    ("- max_steps\n", "must hold a mapping of option names to values"),
    ("max_steps: [1, 2\n", "cannot read the --config file"),
])
def test_bad_config_files(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    expect_usage_error(["sft", "--config", str(path)], message, capsys)


def test_missing_files(tmp_path, capsys):
    (tmp_path / "empty-dir").mkdir()
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    cases = [
        (["sft", "--config", str(tmp_path / "missing.yaml")], "config file"),
        (["sft", "--config"], "--config needs a file name"),
        (["sft", "--idlora_indices_path", str(tmp_path / "missing.safetensors")], "--idlora_indices_path"),
        (["sft", "--dataset_name", str(tmp_path / "missing.jsonl")], "--dataset_name: dataset file"),
        (["sft", "--dataset_name", str(wrong)], "sft needs"),  # a bad column
        (["dpo", "--dataset_name", str(wrong)], "dpo needs"),
        (["sft", "--eval_dataset", str(wrong)], "--eval_dataset"),
        (["sft", "--deepspeed", str(tmp_path / "ds.json")], "--deepspeed"),
        (["sft", "--resume_from_checkpoint", str(tmp_path / "nope")], "--resume_from_checkpoint"),
        (["dpo", "--resume_from_checkpoint", str(tmp_path / "empty-dir")],
         "not a complete checkpoint of an adapter (no adapter_model"),
        (["sft", "--resume_from_checkpoint", "last", "--output_dir", str(tmp_path)], "no complete checkpoint-N folder"),
    ]
    for argv, message in cases:
        expect_usage_error(argv, message, capsys)


def test_bad_dataset_mixtures(tmp_path, capsys):
    """`datasets:` in a --config file (TRL's mixture): a missing file, wrong columns, and a --dataset_name beside it."""
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    cases = [(tmp_path / "missing.jsonl", [], "datasets (the --config file's mixture): cannot load it"),
             (wrong, [], "datasets: 'datasets' has columns ['answer', 'question']; sft needs"),
             (wrong, ["--dataset_name", str(wrong)], "--dataset_name or a `datasets:` mixture"),
             (wrong, ["--dataset_train_split", "validation"], "not --dataset_train_split 'validation'")]
    for i, (data, extra, message) in enumerate(cases):
        config = tmp_path / f"mix{i}.yaml"
        config.write_text(f"datasets:\n  - path: json\n    data_files: {data}\n")
        expect_usage_error(["sft", "--config", str(config), *extra], message, capsys)


def test_bad_model_paths(tmp_path, capsys):
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "file.bin").write_text("x")
    expect_usage_error(["sft", "--model_name_or_path", str(tmp_path / "nope")], "does not exist", capsys)
    expect_usage_error(["dpo", "--model_name_or_path", str(tmp_path / "not-a-model")], "no config.json", capsys)
    expect_usage_error(["decompose", "--model_name_or_path", str(tmp_path / "file.bin")], "is a file", capsys)
    expect_usage_error(["sft", "--model_name_or_path", "no-such-org/no-such-model"], "cannot load model", capsys)


def test_settings_that_do_not_fit_the_model(tiny_model_dir, tmp_path, capsys):
    base = ["--model_name_or_path", tiny_model_dir, "--max_steps", "1", "--eval_samples", "0",
            "--output_dir", str(tmp_path / "o")]
    expect_usage_error(["sft", *base, "--idlora_r", "32", "--idlora_num_clusters", "4"], "num_clusters * r", capsys)
    expect_usage_error(["sft", *base, "--lora_target_modules", "no_such_proj"], "no_such_proj", capsys)
    index = tmp_path / "r8.safetensors"
    main(["decompose", "--model_name_or_path", tiny_model_dir, "--idlora_r", "8", "--idlora_num_clusters", "2",
          "--output", str(index)])
    capsys.readouterr()
    expect_usage_error(["sft", *base, "--idlora_r", "8", "--idlora_num_clusters", "3",
                        "--idlora_indices_path", str(index)], "other settings", capsys)
    wrong = tmp_path / "eval.jsonl"
    wrong.write_text(json.dumps({"text": "hello"}) + "\n")
    expect_usage_error(["sft", *base, "--eval_dataset", str(wrong)], "needs 'prompt' and 'completion'", capsys)


@pytest.mark.parametrize("argv, message", [
    (["count", "no/such/model"], "neither a model directory, a config.json, nor one of"),
    (["count", "llama-3.2-3b", "--idlora_r", "6", "--idlora_rank_boost", "4"], "r must be divisible by rank_boost=4"),
    (["count", "llama-3.2-3b", "--idlora_r", "512"], "num_clusters * r <= 1024"),
    (["count", "llama-3.2-3b", "--lora_target_modules", "nothing_here"], "nothing_here"),
    (["count"], "the following arguments are required: model"),
])
def test_bad_count_input(argv, message, capsys):
    expect_usage_error(argv, message, capsys)


def test_bad_model_config_file_for_count(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "no-such-architecture"}))
    expect_usage_error(["count", str(path)], "cannot read a model config", capsys)


def test_console_script_reports_errors_in_one_line(tmp_path):
    """The console script, end to end: exit status 2 and no traceback."""
    script = Path(sys.executable).with_name("idlora-trl")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "idlora_trl_app.cli"]
    result = subprocess.run([*command, "sft", "--tasks", "poetry"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "idlora-trl sft: error: --tasks: unknown built-in task(s) ['poetry']; choose from arithmetic, sentiment, "
        "instructions"]
