"""Section 6: inference speed: prefill, decoding with the KV cache, and the forward at a few tokens.

Models, all from the same base weights (SmolLM2-135M-Instruct, fp32, the main job's targets q,k,v,gate,up): the
base; PEFT LoRA r=p unmerged and merged; ID-LoRA r=4p with the token router (the default, not mergeable); ID-LoRA
r=4p with the static router, merged. Adapters start away from zero (random B), as after training. Each round runs
every model in turn (interleaved), eager, then compiled (`torch.compile`, inductor) for the base, unmerged LoRA and
ID-LoRA; a merged model is a plain base model, so its compiled graph is the base's:
- prefill: one forward of `--prefill` tokens at batch 1, filling the KV cache (tokens/s);
- decode: after an untimed prefill of a 32-token prompt, `--decode` greedy steps of one token per sequence with the
  cache, at batch 1 and 8 (tokens/s: batch x steps / time);
- small forward: one forward of 4 tokens without the cache (the per-call cost, seconds).
Ratios are medians of the per-round ratios (ID-LoRA / LoRA rounds ran side by side).
"""
from benchmarks.inference.measure import add_arguments, run
from benchmarks.inference.report import render

__all__ = ["add_arguments", "run", "render"]
