"""Several processes: which rank prints, DeepSpeed's start-up (the process group, before the trainer's config is
built) and its quiet import on a CPU, and leaving the process group at the end."""

from __future__ import annotations

import os
from typing import Optional

from .errors import UsageError


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun, deepspeed), or a single process: the one that prints."""
    return int(os.environ.get("RANK", "0")) == 0


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def uses_deepspeed(training) -> bool:
    """--deepspeed, or `accelerate launch` with a DeepSpeed config (its environment)."""
    return bool(training.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")


def start_deepspeed(config: Optional[str]) -> None:
    """Check the DeepSpeed config file, and on a machine without CUDA start the process group over gloo
    (DeepSpeed would pick NCCL). Imports DeepSpeed: only ever called for a DeepSpeed run, before `SFTConfig` /
    `DPOConfig` is built (building it switches on `zero.Init`, so that the model then loads partitioned)."""
    if config is not None and not (config.lstrip().startswith("{") or os.path.isfile(config)):
        raise UsageError(f"--deepspeed {config!r} does not exist (this repository ships "
                         "integrations/deepspeed/zero3_cpu_fp32.json and zero3_bf16.json)")
    if cuda_available():
        return
    import deepspeed

    if "RANK" not in os.environ:  # one process without a launcher: a world of one
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                               MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
            os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo")


def quiet_deepspeed_on_cpu() -> None:
    """accelerate imports DeepSpeed wherever it is installed (`extract_model_from_parallel`, called by TRL's trainers),
    and DeepSpeed then warns "Setting accelerator to CPU" on a machine without GPUs, although no DeepSpeed is used.
    Naming the CPU accelerator, which DeepSpeed's own detection would pick there, keeps it quiet."""
    import importlib.util

    import torch

    others = ("intel_extension_for_pytorch", "torch_npu", "habana_frameworks", "torch_sdaa", "torch_mlu")
    if ("DS_ACCELERATOR" in os.environ or torch.cuda.is_available() or torch.backends.mps.is_available()
            or (hasattr(torch, "xpu") and torch.xpu.is_available())
            or any(importlib.util.find_spec(name) for name in others)):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


def end_distributed() -> None:
    """Leave the process group cleanly (left alive, gloo's threads can abort a rank at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
