"""Section 1: trainable parameters, from the model shapes alone (models on the meta device).

The paper's Table 3 (Llama-3.2-3B, all seven projections of every decoder layer: LoRA r=32 1.49%, ID-LoRA
r=128 0.77%), and ID-LoRA at rank 4p against LoRA and DoRA at rank p on Llama-3-8B and Mistral-7B shapes
(the paper: ID-LoRA needs "54% of LoRA", "up to 46% fewer" parameters). Percentages are
trainable / (base + trainable), as PEFT prints them. ID-LoRA and LoRA counts are PEFT's own
(`get_nb_trainable_parameters` of the injected model); `idlora_trl.counting.count_parameters` (what
`idlora-trl count` prints) is checked against them. DoRA = LoRA + one magnitude vector of d_out per module.
"""
from benchmarks.params.measure import add_arguments, run
from benchmarks.params.report import render

__all__ = ["add_arguments", "run", "render"]
