"""Part of section 2: the SmolLM2-135M decomposition on 1 and 2 ranks (issue #12 item 3).

`measure_decomposition.py` does each run (under `torchrun`); this module launches the runs, interleaved
(`report.ranks_why` explains a missed target from the per-rank times they record).
"""
from __future__ import annotations

import os
import sys

from benchmarks.common import ROOT, log, read_json


def measure(args, smollm2_weights) -> dict | None:
    """Decomposition of SmolLM2-135M (all-linear) under ZeRO-3 from `from_pretrained`, with 1 and 2 ranks
    (`torchrun`, one thread per rank, gloo), interleaved; `measure_decomposition.py` does the run and reports the
    core's own decomposition time (the distributed tests check that the ranks agree)."""
    import subprocess
    import tempfile

    if args.smoke or args.no_smollm2 or args.rank_repeats <= 0 or not smollm2_weights():
        return None
    env = dict(os.environ, OMP_NUM_THREADS="1")
    times: dict[int, list[float]] = {1: [], 2: []}
    detail: dict[int, list[list[dict]]] = {1: [], 2: []}  # per run, per rank: where the time went
    for _ in range(args.rank_repeats):
        for world in (1, 2):
            with tempfile.TemporaryDirectory() as out:
                subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                                "-m", "benchmarks.clustering.measure_decomposition", out, "--zero3"], check=True,
                               env=env, cwd=ROOT, capture_output=True)
                ranks = [read_json(os.path.join(out, f"rank{i}.json")) for i in range(world)]
            times[world].append(max(r["decomposition_s"] for r in ranks))
            detail[world].append([{key: r[key] for key in ("decomposition_s", "select_rows_s", "select_rows_cpu_s")}
                                  for r in ranks])
            log(f"clustering: SmolLM2 decomposition on {world} rank(s): {times[world][-1]:.1f} s")
    return {"one_rank_s": times[1], "two_ranks_s": times[2], "threads_per_rank": 1,
            "one_rank_detail": detail[1], "two_ranks_detail": detail[2]}
