"""Section 4: does ID-LoRA learn as well as LoRA at about half the parameters? A protocol that can tell.

SmolLM2-135M-Instruct (fp32) is fine-tuned with TRL on the protocol's task set (`tasks.py`: the built-in tasks with
sentiment made harder by negation, contrast and adjectives from a real lexicon, and ISO 3166 country codes from
pycountry; round 1 used the built-in set, "sft-v2"), at the main job's targets, schedule and length (`idlora-trl
sft`'s defaults), with half its steps and half its batch (30 steps of 4 rows): one run of the main job's size takes
~4 min on 2 cores, one of these ~2 min (plus ~1.5 min to score the test split). Measured cost: the main comparison
~2.7 h of single-worker time, the ablations ~3.5 h; two workers with `--threads 1` (a `--methods` or `--ablations`
subset each, same `--quality-dir`) do ~1.4x the work of one on 2 cores, so the whole protocol takes ~4.5 h there, in
sittings:

1. **Learning-rate grid, on validation only.** Every method (PEFT LoRA and DoRA at rank p, PEFT VeRA, ID-LoRA
   at rank 4p) trains at each rate of one log-spaced grid with `--grid-seeds` seeds; its rate is the one with the
   lowest mean validation answer NLL (`sft_dataset("validation")`, disjoint from train and test). A method whose
   best rate lies on an edge of the grid gets the next rate beyond it, until its best is inside (at most
   `--max-extend` steps), so no method is judged at a rate that cuts its curve short.
2. **Test, at the chosen rates**: `--test-seeds` training seeds per method (the grid's seeds are reused), scored on
   `--test-per-task` test items per task: exact match (greedy generation) and answer NLL (teacher-forced).
   Mean, sample standard deviation and a 95% t-interval over seeds.
3. **Ablations** of ID-LoRA, one setting changed from the default each, each at its own best rate from the
   grid (searched over the default's chosen rate and `--ablation-span` grid steps either side, with
   `--ablation-grid-seeds` seeds), then `--ablation-seeds` seeds on test.

Every run is one JSON under `--quality-dir` (`runs.py`); a later invocation resumes from them, so the
protocol can be spread over several sittings (`--quality-minutes` stops starting new runs after that long).
`diagnose.py` adds the measurements that explain the differences.

Round 2 (issue #21) runs the protocol at several budgets (`--quality-steps`, `--quality-batch`, recorded in every
run) for the methods of `runs.named_methods`; `budgets.py` reports them against examples seen, `slow_start.py`
measures the slow start on small activations, and `benchmarks/dpo` is the DPO protocol.
"""
from benchmarks.quality.measure import add_arguments, run
from benchmarks.quality.report import render

__all__ = ["add_arguments", "run", "render"]
