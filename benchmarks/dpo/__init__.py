"""The DPO protocol (issue #21, item 5): ID-LoRA against LoRA on the built-in safety set, each at its own rate.

The command's DPO settings (`DPO_DEFAULTS`: 20 steps of 8 pairs, beta 0.1, sigmoid + SFT loss) on SmolLM2-135M.
A learning-rate grid (log-spaced, extended past a winning edge) with 1 seed per point is ranked on a validation
split held out from the training requests (`runs.splits`); at the chosen rate, 3 seeds are scored on the test
split: reward accuracy and margin against the base model, and refusal rates on held-out harmful and benign
prompts. `python -m benchmarks.dpo` (`__main__.py`) runs and reports it; `runs.py` is one run.
"""
