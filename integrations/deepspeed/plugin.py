"""The DeepSpeed ZeRO-3 plugin: gather a partitioned weight, read-only, while ID-LoRA clusters it.

Under ZeRO-3 every parameter created inside `deepspeed.zero.Init` (for instance by `from_pretrained` or
`from_config` once a `TrainingArguments(deepspeed=...)` or `HfDeepSpeedConfig` is alive) is partitioned over
the ranks: `weight.shape == (0,)`, the full shape is in `weight.ds_shape`, and each rank holds a shard in
`weight.ds_tensor`. ID-LoRA needs the full `[d_out, d_in]` weight once, to cluster its rows.

`idlora_weight_context` answers for a module whose `weight` is a ZeRO-3 parameter (it has `ds_id`) with
`deepspeed.zero.GatheredParameters([weight], modifier_rank=None)`:
- read-only: nothing is broadcast on exit, the shards are kept as they were;
- one weight at a time: the core enters it module by module and keeps a float32 copy only of the module its
  rank clusters, so the extra memory per rank is one gathered weight plus one copy, never the whole model;
- a collective: every rank enters it for the same modules in the same order (the core guarantees it).
The bias is not gathered: the decomposition reads the weight only.

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

from torch import nn

from idlora_trl.hookspecs import hookimpl

def is_zero3_param(param: object) -> bool:
    """True for a parameter managed by DeepSpeed ZeRO-3 (converted by `zero.Init` or `deepspeed.initialize`)."""
    return hasattr(param, "ds_id")


@hookimpl
def idlora_weight_context(module: nn.Module, module_name: str) -> Optional[AbstractContextManager]:
    weight = getattr(module, "weight", None)
    if not is_zero3_param(weight):
        return None
    import deepspeed  # only when ZeRO-3 is really in use

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)
