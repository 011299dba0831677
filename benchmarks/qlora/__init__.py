"""Section 7: QLoRA-style training cost: ID-LoRA (rank 4p) against PEFT LoRA (rank p) on the same bitsandbytes
4-bit base.

Both methods train on a fresh 4-bit (nf4, fp32 compute) load of the same checkpoint, stepped in turn after a
warm-up, as in section 3: step (forward + backward + AdamW) and no-grad forward times, and memory (tensors saved
for backward during one forward, the frozen weights left out, + trainable parameters, gradients and AdamW moments).
The quantized base itself weighs the same for both and is reported once. ID-LoRA clusters the dequantized weights
(integrations/bitsandbytes) and adds its update to the 4-bit layer's output out of place (bitsandbytes returns a
view made under no_grad). Needs bitsandbytes (`pip install --no-deps bitsandbytes`); without it the section says so.
"""
from benchmarks.qlora.measure import add_arguments, run
from benchmarks.qlora.report import render

__all__ = ["add_arguments", "run", "render"]
