"""Section 3: training cost of ID-LoRA (rank 4p) against PEFT LoRA and DoRA (rank p), same model, same batch.

Three `PeftModel`s are built from copies of the same base weights (SmolLM2-135M-Instruct, fp32) and run in
turn (LoRA, DoRA, ID-LoRA, LoRA, ...) after a warm-up:
- train step: forward + backward + AdamW step on one fixed batch of random tokens (labels = inputs);
- forward: the same batch under `torch.no_grad()`, in eval mode;
- memory: on the CPU, the bytes of the tensors autograd saves for backward during one forward
  (`torch.autograd.graph.saved_tensors_hooks`, deduplicated by storage, the model's own parameters and
  buffers left out) plus the adapter's training state (trainable parameters + gradients + two AdamW
  moments); on CUDA also `torch.cuda.max_memory_allocated` over one step.
A single adapted layer (SmolLM2's gate_proj shape) is timed the same way, to isolate the adapter from the
rest of the network, and `torch.profiler` shows which operators make the difference.
"""
from benchmarks.training.measure import add_arguments, run
from benchmarks.training.report import render

__all__ = ["add_arguments", "run", "render"]
