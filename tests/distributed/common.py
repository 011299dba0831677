"""Shared by the rank scripts of tests/test_distributed.py (each launched by `torchrun --nproc_per_node 2`).

Nothing here is a test by itself: the scripts write what they observed (JSON, tensors) under an output
folder, and the pytest side compares. Run on CPU with gloo; DeepSpeed's shm-op JIT build is skipped.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from importlib.resources import files
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers' tiny tokenizer, launch.py

from idlora_trl.hookspecs import hookimpl  # noqa: E402
from launch import indices_hash  # noqa: E402,F401  (re-exported for the rank scripts)

CPU_CONFIG = str(files("idlora_trl.integrations.deepspeed") / "zero3_cpu_fp32.json")
BF16_CONFIG = str(files("idlora_trl.integrations.deepspeed") / "zero3_bf16.json")


def init_deepspeed() -> tuple[int, int]:
    """`deepspeed.init_distributed` over gloo, without the 40 s JIT build of DeepSpeed's shm op."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    """End the process group on every rank, then the process, without the interpreter's teardown.

    Left alive, gloo's threads can make one rank abort at exit ("terminate called without an active exception"),
    which fails the launch. Destroying the group is not always enough: after a DeepSpeed run that resumed from a
    checkpoint, one rank in a few still aborted at exit on 2 loaded cores, after it had written all it saw. What
    the rank scripts test is written before this point (files renamed into place), so they leave with os._exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


class WeightContextProbe:
    """Instrumentation only: wraps whatever context the other plugins return and records, per module, the owner
    rank, the context's type, what `__enter__` returned (its shape, or None), what `module.weight` looked like
    inside (full shape or not), and the most bytes of gathered weights alive at once on this rank (the returned
    tensor, else `module.weight` when it is whole). With `keep=True` it also keeps a copy of every tensor
    `__enter__` returned, in `gathered` (module name -> tensor). It never changes the weight or the answer."""

    def __init__(self, keep: bool = False) -> None:
        self.records: list[dict] = []
        self.gathered: dict = {}
        self.keep = keep
        self.live_bytes = 0
        self.peak_live_bytes = 0

    @hookimpl(wrapper=True)
    def idlora_weight_context(self, module, module_name, owner_rank):
        context = yield
        probe = self

        class Recorded:
            def __enter__(self_inner):
                value = context.__enter__()
                weight = module.weight
                full_shape = list(getattr(weight, "ds_shape", weight.shape))
                held = value if value is not None else weight if list(weight.shape) == full_shape else None
                nbytes = 0 if held is None else held.numel() * held.element_size()
                probe.live_bytes += nbytes
                probe.peak_live_bytes = max(probe.peak_live_bytes, probe.live_bytes)
                self_inner.nbytes = nbytes
                status = getattr(weight, "ds_status", None)
                probe.records.append({
                    "module": module_name, "owner": owner_rank, "context": type(context).__name__,
                    "returned": None if value is None else list(value.shape),
                    "shape_inside": list(weight.shape), "full_shape": full_shape, "nbytes": nbytes,
                    "status": None if status is None else status.name,
                })
                if probe.keep and value is not None:
                    probe.gathered[module_name] = value.detach().clone()
                return value

            def __exit__(self_inner, *exc):
                probe.live_bytes -= self_inner.nbytes
                return context.__exit__(*exc)

        return Recorded()


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
