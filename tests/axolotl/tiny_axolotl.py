"""Offline material for real `axolotl train` runs: a tiny Llama and tokenizer saved to a directory, local
jsonl data, configs, and the subprocess call (notes/axolotl.md §6). Nothing is downloaded.

Not a package on purpose (no `__init__.py`): `tests/axolotl/` must never shadow the real `axolotl`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

PLUGIN = "idlora_trl.integrations.axolotl.IDLoRAPlugin"
ENV = {
    "AXOLOTL_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_DISABLED": "true",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}")


def make_tokenizer():
    """helpers' byte-level BPE and ChatML template, trained on the alpaca prompt too (so a row stays short)."""
    from helpers import CORPUS
    from helpers import make_tokenizer as chat_tokenizer

    return chat_tokenizer(CORPUS + [ALPACA.format(**row) for row in sft_rows()] * 4)


def write_tiny_model(directory: Path) -> Path:
    """A 2-layer Llama (hidden 64) and a 400-token BPE tokenizer, saved with `save_pretrained`."""
    from helpers import make_chat_llama

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    model = make_chat_llama(tokenizer, seed=0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sft_rows() -> list[dict]:
    return [{"instruction": f"what is {a} plus {b}?", "input": "", "output": f"it is {a + b}."}
            for a in range(8) for b in range(8)]


def dpo_rows() -> list[dict]:
    return [{"prompt": f"what is {a} plus {b}?", "chosen": f" it is {a + b}.", "rejected": " i cannot help with that"}
            for a in range(6) for b in range(6)]


def base_config(model_dir: Path, work: Path, **overrides) -> dict:
    """A CPU, offline Axolotl config for SFT on `sft.jsonl` next to the model; `overrides` win."""
    cfg = {
        "base_model": str(model_dir),
        "plugins": [PLUGIN],
        "adapter": "idlora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "idlora": {"k": 2, "rank_boost": 2},
        "sequence_len": 128,
        "datasets": [{"path": str(model_dir / "sft.jsonl"), "ds_type": "json", "type": "alpaca"}],
        "val_set_size": 0,
        "dataset_prepared_path": str(work / "prepared"),
        "output_dir": str(work / "out"),
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "max_steps": 4,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "learning_rate": 0.01,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "sample_packing": False,
        "flash_attention": False,
        "gradient_checkpointing": True,
        "save_first_step": False,
        "logging_steps": 1,
        "seed": 0,
    }
    cfg.update(overrides)
    return cfg


def dpo_chat_rows() -> list[dict]:
    """TRL's conversational preference format, as `examples/dpo_safety.yml` expects."""
    return [{"prompt": [{"role": "user", "content": f"what is {a} plus {b}?"}],
             "chosen": [{"role": "assistant", "content": f"it is {a + b}."}],
             "rejected": [{"role": "assistant", "content": "i cannot help with that"}]}
            for a in range(6) for b in range(6)]


EXAMPLES = Path(__file__).resolve().parents[2] / "integrations" / "axolotl" / "examples"
# What an example decides and the tiny runs keep; everything else comes from `base_config` (CPU, offline, 4 steps).
FROM_EXAMPLE = {"plugins", "adapter", "rl", "rl_beta", "lora_dropout", "lora_target_linear", "lora_target_modules",
                "idlora", "chat_template", "datasets"}


def load_example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def example_config(name: str, model_dir: Path, work: Path, data: Path, **overrides) -> dict:
    """An example config made runnable on the tiny model: its adapter, idlora block (with k = 2 and r = 8, for
    64-wide layers) and dataset format are kept; the model, data file and training settings are the tiny ones."""
    example = load_example(name)
    cfg = base_config(model_dir, work)
    cfg.update({key: value for key, value in example.items() if key in FROM_EXAMPLE})
    cfg["idlora"] = {**(example.get("idlora") or {}), "k": 2}
    cfg["datasets"] = [{**entry, "path": str(data), "ds_type": "json"} for entry in example["datasets"]]
    cfg.update(overrides)
    return cfg


def dpo_overrides(model_dir: Path) -> dict:
    return {"rl": "dpo",
            "datasets": [{"path": str(model_dir / "dpo.jsonl"), "ds_type": "json", "type": "passthrough",
                          "split": "train"}]}


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def axolotl_executable() -> str:
    candidate = Path(sys.executable).parent / "axolotl"
    return str(candidate) if candidate.exists() else "axolotl"


def run_axolotl_train(config: Path, log: Path, timeout: int = 900) -> tuple[int, str, float]:
    """`axolotl train CONFIG --launcher python` in a subprocess: (exit code, output, seconds)."""
    env = {**os.environ, **ENV}
    env.setdefault("OMP_NUM_THREADS", "2")
    start = time.perf_counter()
    try:
        proc = subprocess.run([axolotl_executable(), "train", str(config), "--launcher", "python"],
                              cwd=config.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
        code, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout or ""
        code, output = -9, (out.decode(errors="replace") if isinstance(out, bytes) else out)
        output += f"\n[timed out after {timeout} s]"
    log.write_text(output)
    return code, output, time.perf_counter() - start
