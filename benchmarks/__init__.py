"""The benchmark suite of idlora-trl (not shipped in the wheel): `python -m benchmarks` from the repository root.

Each section of docs/BENCHMARKS.md is a package with a measuring part (`measure.py`: `add_arguments`, `run`, which
returns the JSON stored in docs/benchmarks/<section>.json) and a reporting part (`report.py`: `render`, from that
JSON alone); `cli.py` runs them and writes the doc, `gpu_check/` is the GPU check (`--gpu-check`) and `main_job/`
the main job's run quoted in the README (`python -m benchmarks.main_job`). Shared helpers are in `common.py`, the
statistics in `stats.py`. Nothing here imports numpy or torch at import time: `cli.main` sets the thread counts
first. The library never imports this package.
"""
