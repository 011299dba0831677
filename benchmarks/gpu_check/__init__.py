"""`python -m benchmarks --gpu-check`: what to run when a GPU is lent, in under 8 minutes on one H100/H200.

Four parts, each timed, then one Markdown table (check, value, target, met?) printed and written with a JSON:
1. tests: `pytest -m cuda tests` in a subprocess (the tests marked `cuda`, among them the adapted forward and
   backward under `torch.cuda.set_sync_debug_mode("error")` and an inductor-compiled model); passed / failed /
   skipped counts;
2. clustering: the product's per-module clustering call (a float32 copy of the weight, then the
   `idlora_select_rows` hook, i.e. PMRC's `select_rows`) on random bf16 weights generated on the GPU, k=4,
   r=64 (the paper's 4p at p=16): one matrix of each distinct Llama-3-8B shape, timed, and extrapolated to
   the model's 7 x 32 matrices; then, when the estimate fits the time budget, all 224 matrices timed one by one;
3. training: step time (forward + backward + AdamW), no-grad forward time and `torch.cuda.max_memory_allocated`
   over a step of ID-LoRA (r=4p) against PEFT LoRA and DoRA (r=p), bf16, on a SmolLM2-135M-shaped Llama built
   from its config (random weights: nothing is read from disk), interleaved (`benchmarks/training/`);
4. decode: tokens/s with the KV cache at batch 1 and 8 and the 4-token forward, ID-LoRA against unmerged LoRA,
   bf16, the same model (`benchmarks/inference/`).

Exit status: 0 when every CUDA test passed and every part ran (a missed speed target is reported in the table,
not an error); 1 when a CUDA test failed or errored, none ran, or a part crashed. Without CUDA it prints one line
and exits 0: nothing to check. `--device cpu` runs the same code at --smoke sizes on the CPU (what CI runs).
"""
from benchmarks.gpu_check.measure import add_arguments, main, skipped_without_cuda
from benchmarks.gpu_check.report import build_rows, exit_status

__all__ = ["add_arguments", "main", "skipped_without_cuda", "build_rows", "exit_status"]
