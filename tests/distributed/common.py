"""Shared by the rank scripts of tests/test_distributed.py (each launched by `torchrun --nproc_per_node 2`).

Nothing here is a test by itself: the scripts write what they observed (JSON, tensors) under an output
folder, and the pytest side compares. Run on CPU with gloo; DeepSpeed's shm-op JIT build is skipped. What the
benchmark suite's rank script needs as well (the process set-up, `WeightContextProbe`) is in
benchmarks/distributed.py and re-exported here.
"""

from __future__ import annotations

import json
import sys
from importlib.resources import files
from pathlib import Path

# tests/ (helpers' tiny tokenizer, launch.py) and the repository root (benchmarks.distributed, shared with the
# measurement scripts of the benchmark suite)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

# first: it sets the offline and DeepSpeed-on-CPU variables before the libraries are imported
from benchmarks.distributed import CPU_CONFIG, WeightContextProbe, init_deepspeed, shutdown  # noqa: E402,F401
from idlora_trl.hookspecs import hookimpl  # noqa: E402,F401
from launch import indices_hash  # noqa: E402,F401  (re-exported for the rank scripts)

BF16_CONFIG = str(files("idlora_trl.integrations.deepspeed") / "zero3_bf16.json")


def all_equal_across_ranks(value) -> bool:
    import torch.distributed as dist

    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.rename(path)


def tiny_llama_config(vocab_size: int, bias: bool = False, hidden: int = 64, layers: int = 2, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, attention_bias=bias, mlp_bias=bias, **extra)


def sft_dataset():
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"what is {a} plus {b}?"}],
         "completion": [{"role": "assistant", "content": f"it is {a + b}."}]}
        for a in range(8) for b in range(8)])


def dpo_dataset():
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"what is {a} plus {b}?"}],
         "chosen": [{"role": "assistant", "content": f"it is {a + b}."}],
         "rejected": [{"role": "assistant", "content": "i cannot help with that"}]}
        for a in range(6) for b in range(6)])


def idlora_config(**overrides):
    from idlora_trl import IDLoRAConfig

    return IDLoRAConfig(**{"r": 8, "num_clusters": 2, "task_type": "CAUSAL_LM", **overrides})


def base_name(name: str) -> str:
    """A PeftModel parameter name as the plain base model names it."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")
