"""Which module's update overflowed: checked on demand, never in the ordinary forward.

With the paper's router (`router_norm="none"`) the update is quadratic in the activations and can overflow where
LoRA's does not; the linear routers (`rms`, `static`) can overflow too, at a rate where LoRA would. Checking every
update in every forward would cost a host synchronisation per module per forward (150 per decoding step of SmolLM2)
and break `torch.compile` graphs. So the forward does not check; instead:

- `overflow_check(model)`: a context in which each ID-LoRA layer checks its update and raises `FloatingPointError`
  naming the module whose update turned a finite base output into inf/NaN (the adapter runs its unfused path);
- the trainers (`IDLoRASFTTrainer`, `IDLoRADPOTrainer`) read each training step's loss, which the Trainer already
  reads for its own logging, and only when it is not finite run that step's batch again under `overflow_check`, so
  that the error names the module instead of leaving a NaN loss.

    with idlora_trl.overflow_check(model), torch.no_grad():
        model(**batch)       # FloatingPointError: ... on module 'model.layers.3.mlp.gate_proj' turned a finite ...
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from .layer import idlora_layers


@contextlib.contextmanager
def overflow_check(model: nn.Module) -> Iterator[None]:
    """Check every ID-LoRA update of `model` for overflow while the context is open (host syncs: diagnosis only)."""
    layers = [layer for _, layer in idlora_layers(model)]
    before = [layer.check_overflow for layer in layers]
    for layer in layers:
        layer.check_overflow = True
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            layer.check_overflow = value
