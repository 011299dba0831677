"""The bitsandbytes plugin: cluster the rows of a 4-bit (nf4, fp4) or 8-bit base weight as the layer computes with
them, dequantized.

A bitsandbytes layer stores its weight packed (`Params4bit`: `[d_out * d_in / 2, 1]` uint8 plus a quant state;
`Int8Params`: int8 codes plus per-row scales `SCB`), so `module.weight` is not the `[d_out, d_in]` matrix whose rows
ID-LoRA clusters: clustering the codes would pick other rows than the model computes with. `idlora_weight_context`
answers for such a module with the dequantized weight (bitsandbytes' own dequantization, on the layer's device),
on the rank that clusters it only, and `None` for every other module, so the plain-weight and DeepSpeed plugins
answer there. The adapted forward needs nothing special: it gathers the skeleton outputs from the quantized layer's
own output. The indices equal those of the same model with the dequantized weights in float
(`tests/test_quantized.py`).

Registered through the entry point `[project.entry-points.idlora_trl] bitsandbytes = ...`; bitsandbytes is
imported only when a quantized weight is met.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Optional

import torch
from torch import nn

from idlora_trl.hookspecs import hookimpl

PACKED = ("Params4bit", "Int8Params")


def is_bitsandbytes_weight(weight) -> bool:
    return type(weight).__name__ in PACKED and type(weight).__module__.startswith("bitsandbytes")


def dequantize(module: nn.Module) -> torch.Tensor:
    """The `[d_out, d_in]` float32 weight a bitsandbytes layer computes with; the module is left untouched (PEFT's
    `dequantize_module_weight` reassigns `module.weight` on a CPU)."""
    import bitsandbytes as bnb

    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            return computed_weight(module)
        full = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    else:  # Int8Params: int8 codes and one scale per row
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        full = bnb.functional.int8_vectorwise_dequant(weight.data, scales)
    return full.detach().to(torch.float32)


@torch.no_grad()
def computed_weight(module: nn.Module) -> torch.Tensor:
    """The weight as the layer computes with it: its output for the identity, less the bias. For a 4-bit weight that
    bitsandbytes repacked for its AVX512-BF16 CPU kernel (the first eval-mode forward on such a CPU does): the
    packed data no longer dequantizes directly, and bitsandbytes' inverse of the packing is not exact."""
    columns = []
    for start in range(0, module.in_features, 1024):  # the identity in slices: at most 1024 x d_in at a time
        eye = torch.eye(module.in_features, device=module.weight.device, dtype=torch.float32)[start:start + 1024]
        out = module(eye).float()
        columns.append(out - module.bias.float() if module.bias is not None else out)
    return torch.cat(columns).t().contiguous()


@contextlib.contextmanager
def dequantized(module: nn.Module, read: bool):
    yield dequantize(module) if read else None  # only the rank that clusters the module reads it


@hookimpl
def idlora_weight_context(module: nn.Module, module_name: str, owner_rank: int) -> Optional[AbstractContextManager]:
    if not is_bitsandbytes_weight(getattr(module, "weight", None)):
        return None
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else 0
    return dequantized(module, read=rank == owner_rank)
