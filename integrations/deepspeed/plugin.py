"""The DeepSpeed ZeRO-3 plugin: gather a partitioned weight, read-only, to the one rank that clusters it.

Under ZeRO-3 every parameter created inside `deepspeed.zero.Init` (for instance by `from_pretrained` or
`from_config` once a `TrainingArguments(deepspeed=...)` or `HfDeepSpeedConfig` is alive) is partitioned over
the ranks of `weight.ds_process_group`: `weight.shape == (0,)`, the full shape is in `weight.ds_shape`, and
group rank `i` holds elements `[i * p, (i + 1) * p)` of the flattened weight in `weight.ds_tensor` (`p =
ds_tensor.ds_numel`, the last shard padded up to `p`; DeepSpeed's `_partition_param`). ID-LoRA needs the
full `[d_out, d_in]` weight once, to cluster its rows, and only on the rank that clusters that module.

`idlora_weight_context` answers for a module whose `weight` is a ZeRO-3 parameter (it has `ds_id`) with
`GatherToOwner`: every rank of the group sends its shard to `owner_rank` (`torch.distributed.gather`), which
alone joins them into the full weight and returns it from `__enter__` (the others get `None`):
- read-only: `weight.data` and the shards are never touched; the gathered tensor is dropped on exit;
- one weight at a time, on one rank: the core enters it module by module and keeps a float32 copy only of the
  module its rank clusters, so the extra memory is one gathered weight plus one copy on the owner, and nothing
  on the other ranks (an all-gather would give every rank every weight);
- a collective: every rank enters it for the same modules in the same order (the core guarantees it);
- the group is the one DeepSpeed partitioned the weight over (`ds_process_group`: the world, unless
  `zero.Init(data_parallel_group=...)` or an expert-parallel group made it a subset); `owner_rank` is a global
  rank, and a group that does not hold the owner skips the module (none of its ranks reads it; the owner gets
  its own group's weight, as an all-gather within each group would give it);
- no communication when the weight is already whole (`ds_status` AVAILABLE, e.g. inside another
  `GatheredParameters`: its `data` is returned) or the group has one rank (the shard is the weight);
- the shards go over the group's backend: on CPU for gloo, on the current accelerator device otherwise (NCCL
  needs it), so a shard offloaded to CPU is copied there first.
Weights offloaded to NVMe or quantized by ZeRO (`zero_quantized_nontrainable_weights`) are left to
`deepspeed.zero.GatheredParameters([weight], modifier_rank=None)` (an all-gather; it swaps them in and
dequantizes), which returns `None` so the core reads `weight`. The bias is not gathered: the decomposition
reads the weight only.

For any other module it returns `None`, so the built-in plain-weight plugin answers. DeepSpeed is imported
only when a ZeRO-3 parameter is met, so the plugin costs nothing in runs without DeepSpeed.

Registered through the entry point `[project.entry-points.idlora_trl] deepspeed = ...` of idlora-trl, so it is
active in every process where the package is installed: through `IDLoRASFTTrainer`/`IDLoRADPOTrainer` (TRL
calls `peft.get_peft_model`) and through a plain `get_peft_model` alike. The index tables are then shared
across ranks by the built-in `idlora_sync_indices` (DeepSpeed runs on `torch.distributed`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from idlora_trl.hookspecs import hookimpl


def is_zero3_param(param: object) -> bool:
    """True for a parameter managed by DeepSpeed ZeRO-3 (converted by `zero.Init` or `deepspeed.initialize`)."""
    return hasattr(param, "ds_id")


class GatherToOwner:
    """Gathers the shards of one ZeRO-3 parameter to the global rank `owner_rank`; `__enter__` returns the full
    weight (shape `ds_shape`, the parameter's dtype) there and `None` on every other rank."""

    def __init__(self, param: torch.nn.Parameter, owner_rank: int) -> None:
        self.param, self.owner_rank, self.full = param, owner_rank, None

    def __enter__(self) -> Optional[torch.Tensor]:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        param = self.param
        rank = dist.get_rank() if dist.is_initialized() else 0
        if param.ds_status == ZeroParamStatus.AVAILABLE:  # already whole on every rank (gathered collectively)
            self.full = param.data.view(param.ds_shape) if rank == self.owner_rank else None
            return self.full
        group = getattr(param, "ds_process_group", None) if dist.is_initialized() else None
        members = dist.get_process_group_ranks(group or dist.group.WORLD) if dist.is_initialized() else [0]
        if self.owner_rank not in members:  # the owner's own group gathers it for the owner
            return None
        shard = param.ds_tensor.detach().view(-1)
        if len(members) == 1:  # the shard is the whole weight
            self.full = shard.narrow(0, 0, param.ds_numel).view(param.ds_shape)
            return self.full
        send = shard.to(comm_device(group), copy=False).contiguous()
        if rank == self.owner_rank:
            flat = torch.empty(send.numel() * len(members), dtype=send.dtype, device=send.device)
            shards = list(flat.split(send.numel()))  # in group-rank order: the ranks' slices of the weight
            dist.gather(send, shards, dst=self.owner_rank, group=group)
            self.full = flat.narrow(0, 0, param.ds_numel).view(param.ds_shape)
        else:
            dist.gather(send, None, dst=self.owner_rank, group=group)
        return self.full

    def __exit__(self, *exc) -> None:
        self.full = None  # the gathered weight goes with the last reference the caller holds


def comm_device(group) -> torch.device:
    """Where a collective over `group` wants its tensors: CPU for gloo, the current accelerator device otherwise
    (NCCL and the other device backends), as DeepSpeed's own all-gather does."""
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


@hookimpl
def idlora_weight_context(module: nn.Module, module_name: str, owner_rank: int) -> Optional[AbstractContextManager]:
    weight = getattr(module, "weight", None)
    if not is_zero3_param(weight):
        return None
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum  # only when ZeRO-3 is really in use

    shard = weight.ds_tensor
    if getattr(shard, "final_location", None) == OffloadDeviceEnum.nvme or hasattr(shard, "ds_quant_scale"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)  # swaps in / dequantizes
    return GatherToOwner(weight, owner_rank)
