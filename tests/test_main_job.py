"""The README quotes one run of the main job (`make sft`): the quote is what benchmarks/main_job/ stored, and a fresh
run prints the same figures on the machine that measured them.

The figures depend on the code, the library versions, the CPU family and the number of threads (other CPUs round
the last bits differently). Where any of these but the code differs from the stored run, the fresh run is skipped
with what differs; where they match, a changed figure fails: rerun `python -m benchmarks.main_job` and commit.
"""

import json

import pytest
from helpers import smollm2_or_skip

from benchmarks import main_job


def stored() -> dict:
    return json.loads(main_job.RECORD.read_text())


def test_the_readme_quotes_the_stored_run():
    record = stored()
    assert main_job.readme_block() == main_job.render(record), "rerun `python -m benchmarks.main_job --render`"
    assert record["machine"].keys() == main_job.machine().keys() and len(record["figures"]) == 8


def test_figures_are_read_from_the_jobs_output():
    output = "\n".join([
        "| ID-LoRA r=32 | 972,480 | 0.72% |", "| LoRA r=8 | 1,658,880 | 1.22% |", "| DoRA r=8 | 1,779,840 | 1.31% |",
        "ID-LoRA trains 58.6% of LoRA's parameters.", "Training 60 steps, batch 8, lr 0.0005:",
        "training: 60 steps in 245.1 s; loss 2.0242 (step 1) -> 0.0658 (steps 56-60); mean 0.3",
        "| task | held-out n | accuracy before | accuracy after |",
        "| arithmetic | 32 | 0.062 (2/32) | 0.906 (29/32) |",
        "| sentiment | 32 | 0.000 (0/32) | 1.000 (32/32) |", "| instructions | 32 | 0.000 (0/32) | 0.688 (22/32) |"])
    lines = main_job.figures(output)
    assert lines[4] == "training: 60 steps; loss 2.0242 (step 1) -> 0.0658 (steps 56-60); mean 0.3"
    assert lines[1] == "| LoRA r=8 | 1,658,880 | 1.22% |" and lines[-1].startswith("| instructions | 32 |")
    with pytest.raises(ValueError, match="task rows"):
        main_job.figures(output.replace("| sentiment |", "| mood |"))


@pytest.mark.slow
def test_a_fresh_main_job_prints_the_readme_figures(tmp_path):
    smollm2_or_skip()  # skipped without the wheel, except in CI (CI=true), where it fails
    record, here = stored(), main_job.machine()
    differs = {key: (record["machine"][key], here[key]) for key in here if record["machine"][key] != here[key]}
    if differs:
        pytest.skip(f"the README's run was measured elsewhere (stored, here): {differs}; other CPUs and versions "
                    "round differently. Rerun `python -m benchmarks.main_job` to quote this machine.")
    output, seconds = main_job.run_job(tmp_path / "sft-idlora")
    print(f"main job: {seconds:.0f} s")
    assert main_job.figures(output) == record["figures"], (
        "the main job no longer prints the README's figures: rerun `python -m benchmarks.main_job` and commit\n"
        + output[-3000:])
