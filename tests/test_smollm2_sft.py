"""The real model: a few ID-LoRA SFT steps on SmolLM2-135M-Instruct raise held-out accuracy on a built-in task.

Runs `idlora-trl sft` in-process on the built-in arithmetic task (held-out names, objects and number pairs)
with the default ID-LoRA settings: 16 steps, about 50 s of training on 2 CPU cores, plus about 15 s of PMRC
clustering the first time (`idlora-trl sft` caches the embedded model's indices).

Why arithmetic and not sentiment: with ID-LoRA, SmolLM2 learns the sentiment task's answer format within 16
steps but tells POSITIVE from NEGATIVE only later (held-out accuracy 0.53-0.63 after 16 steps, 0.59 after 24;
0.97 after the 50 steps of `idlora-trl sft`), whereas LoRA on q/v reached 1.0 in 15 steps (feasibility
note §1d). The arithmetic task rises from 0 to about 0.7 in 16 steps.
"""

import re

import pytest
from helpers import smollm2_or_skip

from idlora_trl_app.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _real_model():
    smollm2_or_skip()  # skipped without the wheel, except in CI (CI=true), where it fails


def test_sft_raises_held_out_arithmetic_accuracy(tmp_path, capsys):
    main(["sft", "--tasks", "arithmetic", "--max_steps", "16", "--per_device_train_batch_size", "8",
          "--learning_rate", "2e-3", "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "2",
          "--logging_steps", "4", "--eval_samples", "32", "--output_dir", str(tmp_path / "adapter")])
    out = capsys.readouterr().out
    row = re.search(r"\| arithmetic \| 32 \| ([\d.]+) \(\d+/32\) \| ([\d.]+) \(\d+/32\) \|", out)
    assert row, out
    before, after = map(float, row.groups())
    print(f"held-out arithmetic accuracy {before:.3f} -> {after:.3f}")
    assert before <= 0.2 and after >= 0.4, out
    losses = [float(x) for x in re.findall(r"step +\d+/16  loss ([\d.]+)", out)]
    assert len(losses) == 5 and losses[-1] < losses[0] / 2, out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
