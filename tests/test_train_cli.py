"""`idlora-trl sft` / `dpo` / `decompose` on a tiny Llama saved to disk, config files, and every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idlora_trl.cli import build_parser, main
from idlora_trl.indices import read_indices

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--r", "8", "--num-clusters", "2", "--batch-size", "4", "--logging-steps", "1", "--eval-samples", "2",
        "--eval-batch-size", "8"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Llama with an in-memory BPE tokenizer and a ChatML template, saved like a real checkpoint."""
    from helpers import make_chat_llama, make_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer()
    make_chat_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _run(argv, capsys):
    main(argv)
    captured = capsys.readouterr()
    return captured.out


def _adapter_tensors(path) -> dict:
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_sft_trains_prints_and_saves(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "adapter"
    out = _run(["sft", "--model", tiny_model_dir, *TINY, "--max-steps", "3", "--max-train-samples", "12",
                "--learning-rate", "1e-2", "--output-dir", str(out_dir)], capsys)
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


def test_decompose_then_sft_reuses_the_index_file(tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    index = tmp_path / "tiny.safetensors"
    out = _run(["decompose", "--model", tiny_model_dir, "--r", "8", "--num-clusters", "2", "--output", str(index)],
               capsys)
    assert "Clustered 10 modules" in out and str(index) in out  # default targets: q, k, v, gate, up x 2 layers
    tables, spec = read_indices(index)
    assert spec["r"] == 8 and spec["num_clusters"] == 2 and len(tables) == 10
    assert all(t.shape == (2, 8) for t in tables.values())

    adapter = tmp_path / "adapter"
    out = _run(["sft", "--model", tiny_model_dir, *TINY, "--max-steps", "1", "--max-train-samples", "4",
                "--eval-samples", "0", "--indices-path", str(index), "--output-dir", str(adapter)], capsys)
    assert f"clustering skipped: indices from {index}" in out
    saved = _adapter_tensors(adapter)
    name = "model.layers.0.self_attn.q_proj"
    key = next(k for k in saved if name in k and "idlora_indices" in k)
    assert torch.equal(saved[key], tables[name])
    # The adapter carries its indices: it loads without the index file.
    index.unlink()
    assert json.loads((adapter / "adapter_config.json").read_text())["indices_path"] is None
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.idlora_indices["default"], tables[name])


def test_sft_on_a_user_jsonl_with_eval_dataset(tiny_model_dir, tmp_path, capsys):
    rows = [{"prompt": f"what is {a} plus 1?", "completion": str(a + 1)} for a in range(8)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _run(["sft", "--model", tiny_model_dir, *TINY, "--max-steps", "2", "--dataset", str(path),
                "--eval-dataset", str(path), "--eval-samples", "3", "--output-dir", str(tmp_path / "a")], capsys)
    assert f"data: {path} (8 training rows, 3 held-out)" in out
    assert "| dataset | 3 |" in out


def test_dpo_prints_rewards_and_refusal_rates(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "dpo"
    out = _run(["dpo", "--model", tiny_model_dir, *TINY, "--max-steps", "2", "--max-train-samples", "8",
                "--max-new-tokens", "4", "--output-dir", str(out_dir)], capsys)
    assert "Refusal rate on held-out prompts before training" in out
    assert "rewards/accuracies" not in out  # printed under short names
    assert "step    2/2  loss" in out and "accuracies" in out and "margins" in out
    assert "reward accuracy" in out and "held-out pairs (4): reward accuracy" in out
    assert "| harmful | 2 |" in out and "| benign | 2 |" in out
    assert (out_dir / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------- config files
def _resolve(argv):
    from idlora_trl.cli.args import resolve

    return resolve(build_parser().parse_args(argv))


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_sets_values_and_flags_override(tmp_path, suffix):
    values = {"max-steps": 7, "learning_rate": 0.004, "target-modules": ["q_proj", "v_proj"], "router": "static",
              "batch_size": 3}
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        import yaml

        path.write_text(yaml.safe_dump(values))
    opts = _resolve(["sft", "--config", str(path), "--batch-size", "8"])  # 8 is also the default: still wins
    assert (opts.max_steps, opts.learning_rate, opts.router) == (7, 0.004, "static")
    assert opts.target_modules == "q_proj,v_proj" and opts.batch_size == 8
    assert _resolve(["sft"]).max_steps != 7  # defaults apply without a file


def test_launcher_arguments_are_accepted():
    """The deepspeed launcher adds --local_rank=N; torchrun needs --idlora-r (it takes --r for its own options)."""
    opts = _resolve(["sft", "--local_rank=1", "--idlora-r", "16", "--deepspeed", "ds.json", "--bf16"])
    assert (opts.r, opts.local_rank, opts.deepspeed, opts.bf16) == (16, 1, "ds.json", True)
    assert _resolve(["dpo", "--r", "8"]).r == 8


def _expect_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) <= 2, err  # argparse's own errors add the usage line
    return err


@pytest.mark.parametrize("content, message", [
    ("max_steps: 3\nno_such_flag: 1\n", "unknown key 'no_such_flag'"),
    ("max_steps: abc\n", "max_steps: invalid positive integer value 'abc'"),
    ("max_steps: 0\n", "max_steps: invalid positive integer value 0"),
    ("learning_rate: -1\n", "invalid positive number value -1"),
    ("router: softmax\n", "invalid choice 'softmax'"),
    ("max_steps: true\n", "expected positive integer, got True"),
    ("- max_steps\n", "must hold a mapping"),
    ("max_steps: [1, 2\n", "cannot parse config file"),
    ("func: 3\n", "unknown key 'func'"),
])
def test_bad_config_files(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    _expect_usage_error(["sft", "--config", str(path)], message, capsys)


def test_bad_inputs_before_any_model_is_loaded(tmp_path, capsys):
    (tmp_path / "empty-dir").mkdir()
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    cases = [
        (["sft", "--config", str(tmp_path / "missing.yaml")], "does not exist"),
        (["sft", "--indices-path", str(tmp_path / "missing.safetensors")], "index file"),
        (["sft", "--tasks", "poetry"], "unknown built-in task(s) ['poetry']"),
        (["sft", "--dataset", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["sft", "--dataset", str(wrong)], "sft needs"),
        (["dpo", "--dataset", str(wrong)], "dpo needs"),
        (["sft", "--r", "6", "--rank-boost", "4"], "r must be divisible by rank_boost=4"),
        (["sft", "--min-cluster-size", "4"], "min_cluster_size"),
        (["decompose", "--indices-path", str(wrong)], "unrecognized arguments: --indices-path"),
        (["sft", "--deepspeed", str(tmp_path / "ds.json")], "DeepSpeed config"),
    ]
    for argv, message in cases:
        _expect_usage_error(argv, message, capsys)


@pytest.mark.parametrize("argv, message", [
    (["sft", "--max-steps", "0"], "invalid positive integer value: '0'"),
    (["sft", "--learning-rate", "fast"], "invalid positive number value: 'fast'"),
    (["dpo", "--beta", "-0.1"], "invalid positive number value"),
    (["sft", "--idlora-dropout", "1.5"], "invalid probability in [0, 1) value"),
    (["sft", "--router", "softmax"], "invalid choice: 'softmax'"),
])
def test_bad_flag_values(argv, message, capsys):
    _expect_usage_error(argv, message, capsys)


def test_bad_model_paths(tmp_path, capsys):
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "file.bin").write_text("x")
    _expect_usage_error(["sft", "--model", str(tmp_path / "nope")], "does not exist", capsys)
    _expect_usage_error(["dpo", "--model", str(tmp_path / "not-a-model")], "no config.json", capsys)
    _expect_usage_error(["decompose", "--model", str(tmp_path / "file.bin")], "is a file", capsys)
    _expect_usage_error(["sft", "--model", "no-such-org/no-such-model"], "cannot load model", capsys)


def test_settings_that_do_not_fit_the_model(tiny_model_dir, tmp_path, capsys):
    base = ["--model", tiny_model_dir, "--max-steps", "1", "--eval-samples", "0", "--output-dir", str(tmp_path / "o")]
    _expect_usage_error(["sft", *base, "--r", "32", "--num-clusters", "4"], "num_clusters * r", capsys)
    _expect_usage_error(["sft", *base, "--target-modules", "no_such_proj"], "no_such_proj", capsys)
    index = tmp_path / "r8.safetensors"
    main(["decompose", "--model", tiny_model_dir, "--r", "8", "--num-clusters", "2", "--output", str(index)])
    capsys.readouterr()
    _expect_usage_error(["sft", *base, "--r", "8", "--num-clusters", "3", "--indices-path", str(index)],
                        "other settings", capsys)
    wrong = tmp_path / "eval.jsonl"
    wrong.write_text(json.dumps({"text": "hello"}) + "\n")
    _expect_usage_error(["sft", *base, "--eval-dataset", str(wrong)], "needs 'prompt' and 'completion'", capsys)


def test_console_script_reports_errors_in_one_line(tmp_path):
    """The console script, end to end: exit status 2 and no traceback."""
    script = Path(sys.executable).with_name("idlora-trl")
    command = [str(script)] if script.is_file() else [
        sys.executable, "-c", "import sys; from idlora_trl.cli import main; sys.argv[0] = 'idlora-trl'; main()"]
    result = subprocess.run([*command, "sft", "--tasks", "poetry"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "idlora-trl sft: error: unknown built-in task(s) ['poetry']; choose from arithmetic, sentiment, instructions"]


# ---------------------------------------------------------------------------------------------- examples
@pytest.mark.parametrize("script, expect", [
    ("sft_subclass.py", "router |T|"),
    ("dpo_safety.py", "refusal rate"),
    ("sft_multitask.py", "| sentiment |"),
])
def test_examples_run_in_tiny_mode(tiny_model_dir, tmp_path, script, expect):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--model", tiny_model_dir, "--tiny",
                             "--output-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=240, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert expect in result.stdout, result.stdout[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_router_norm_and_pmrc_qr_reach_the_config():
    from idlora_trl.cli.args import build_idlora_config

    config = build_idlora_config(_resolve(["sft", "--router-norm", "rms", "--selection", "pmrc-qr"]))
    assert (config.router_norm, config.selection) == ("rms", "pmrc-qr")
    assert build_idlora_config(_resolve(["sft"])).router_norm == "none"  # the paper's router by default
