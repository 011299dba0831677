"""Float32 for the adapter under mixed precision (docs/METHOD.md: the update is quadratic in the activations).

PEFT keeps LoRA's weights in float32 on a half-precision base when `autocast_adapter_dtype=True`, but a later
`peft_model.to(torch.bfloat16)` casts them down, and under `torch.autocast` every matmul of the adapter runs
in the autocast dtype. ID-LoRA keeps both its parameters and its arithmetic in float32 in every case:

- `keep_float32(module)`: after a dtype conversion (`.to(dtype)`, `.half()`, `.bfloat16()`), floating-point
  parameters (and their gradients) of the adapter are put back to at least float32, in place (the same
  `Parameter` objects, so an optimizer holding them is unaffected);
- `float32_region(tensor)`: a context in which autocast is off for the tensor's device type, so the adapter's
  matmuls run in the dtype of their (float32) inputs.

Half-precision adapter weights are refused, not silently ignored: see `check_adapter_dtype_request`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

HALF = (torch.float16, torch.bfloat16)


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of adapter parameters next to a base of `dtype`: at least float32."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


@torch.no_grad()
def keep_float32(module: nn.Module) -> None:
    """Put every floating-point parameter (and gradient) of `module` below float32 back to float32, in place."""
    for param in module.parameters():
        if param.is_meta or not param.dtype.is_floating_point:
            continue
        wanted = adapter_dtype(param.dtype)
        if param.dtype != wanted:
            param.data = param.data.to(wanted)
            if param.grad is not None:
                param.grad = param.grad.to(wanted)


def float32_region(tensor: torch.Tensor):
    """A context with autocast off on `tensor`'s device type (a no-op when autocast is not on)."""
    device_type = tensor.device.type
    if device_type == "cpu" and not torch.is_autocast_enabled("cpu"):  # the common case, without try/except
        return contextlib.nullcontext()
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


def half_precision_bases(layers) -> set[torch.dtype]:
    """The half-precision dtypes among the base weights of `layers` (ID-LoRA layers)."""
    dtypes = {layer.get_base_layer().weight.dtype for layer in layers}
    return {dtype for dtype in dtypes if dtype in HALF}


def autocast_false_error(dtypes: set[torch.dtype]) -> str:
    names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
    return (
        f"ID-LoRA does not support autocast_adapter_dtype=False on a {names} base model: its update is quadratic "
        "in the activations, so its weights and arithmetic always stay float32 (docs/METHOD.md). Leave "
        "autocast_adapter_dtype at its default (True) in get_peft_model / PeftModel.from_pretrained / "
        "load_adapter / add_adapter (Axolotl: peft_autocast_adapter_dtype), or load the base model in float32."
    )
