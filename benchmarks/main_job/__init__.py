"""The main job's run quoted in the README: run `idlora-trl sft` as `make sft` does, store what it printed, and write
it into the README.

    python -m benchmarks.main_job             # run the job (about 6 minutes on 2 cores), store, rewrite the README
    python -m benchmarks.main_job --render    # rewrite the README's block from the stored run only

The figures (trainable parameters, losses, held-out accuracy) are the same on every run with the same code, library
versions, CPU family and number of threads: other CPUs round the last bits differently, and 60 steps make that
visible in the third decimal. So the stored run (docs/benchmarks/main-job.json) records that machine, and
tests/test_main_job.py runs the job again on a machine that matches it and fails when a figure differs (elsewhere
it skips and says what differs).
"""
from benchmarks.main_job.measure import PACKAGES, THREADS, figures, machine, run_job
from benchmarks.main_job.report import BEGIN, END, README, RECORD, readme_block, render, write_readme

__all__ = ["PACKAGES", "THREADS", "figures", "machine", "run_job", "BEGIN", "END", "README", "RECORD",
           "readme_block", "render", "write_readme"]
