"""Train one stored protocol run again on this machine and compare: may runs from different machines share a table?

    python -m benchmarks.quality.recheck docs/benchmarks/quality-runs/id-lora-lr0.001-s0-4eabf930f2.json

The protocol's runs are spread over sittings, and a sitting may get another CPU family (training trajectories differ
in the last bits between them). This rebuilds the run's bench from its recorded setup (budget, rank, split sizes; its
task set must be this checkout's), trains the run into a scratch folder (the stored file is left alone) and prints
the largest difference in its training losses and in its validation answer NLL per task. Exit status 1 when one is
above `--tolerance`, 2 when the run cannot be rebuilt here.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from benchmarks.common import read_json, table
from benchmarks.quality import measure, tasks
from benchmarks.quality.runs import Spec


def rebuild(record: dict, scratch: str):
    """The bench and spec that trained `record`, with runs and adapters under `scratch`."""
    setup = record["setup"]
    if setup.get("data") != tasks.DATA:
        raise SystemExit(f"recheck: the run is of task set {setup.get('data')!r}, this checkout's is {tasks.DATA!r}; "
                         "check it out at a commit of its task set.")
    n = len(tasks.TASKS)
    parser = argparse.ArgumentParser()
    measure.add_arguments(parser)
    args = parser.parse_args([
        "--quality-p", str(setup["p"]), "--quality-steps", str(setup["steps"]), "--quality-batch", str(setup["batch"]),
        "--val-per-task", str(setup["validation"] // n), "--test-per-task", str(setup["test"] // n),
        "--quality-dir", os.path.join(scratch, "runs"), "--work-dir", os.path.join(scratch, "work")])
    args.smoke = setup["model"].endswith("(smoke)")
    bench, _ = measure.build_bench(args)
    if bench.setup != setup:
        differ = sorted(k for k in set(setup) | set(bench.setup) if setup.get(k) != bench.setup.get(k))
        raise SystemExit(f"recheck: this checkout's protocol differs from the run's in {', '.join(differ)} "
                         f"(run: {[setup.get(k) for k in differ]}, here: {[bench.setup.get(k) for k in differ]}).")
    spec = Spec(record["method"], record["lr"], record["seed"], tuple(sorted(record["settings"].items())))
    return bench, spec


def compare(stored: dict, new: dict) -> list[list]:
    """Rows of (quantity, stored, here, |difference|): every training loss (the largest difference) and each task's
    validation NLL. ValueError when the two did not log the same number of losses: they cannot be compared."""
    if len(stored["losses"]) != len(new["losses"]):
        raise ValueError(f"recheck: the run logged {len(stored['losses'])} losses, this one {len(new['losses'])}; "
                         "it was trained by another logging of the protocol, so it cannot be compared here.")
    losses = [abs(a - b) for a, b in zip(stored["losses"], new["losses"])]
    worst = max(range(len(losses)), key=losses.__getitem__)
    rows = [[f"training loss, step {worst + 1} (the largest difference of {len(losses)})", stored["losses"][worst],
             new["losses"][worst], losses[worst]]]
    for task, value in stored["validation"]["nll"].items():
        here = new["validation"]["nll"][task]
        rows.append([f"validation NLL, {task}", value, here, abs(value - here)])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.recheck", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a stored run (docs/benchmarks/quality-runs/*.json)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest difference accepted (default 1e-4)")
    args = parser.parse_args(argv)
    stored = read_json(args.run)
    with tempfile.TemporaryDirectory(prefix="idlora-recheck-") as scratch:
        try:
            bench, spec = rebuild(stored, scratch)
        except SystemExit as error:
            print(error, file=sys.stderr)
            return 2
        name = os.path.splitext(os.path.basename(args.run))[0]
        if spec.key(bench.setup) != name:
            print(f"recheck: {args.run} is not named by its contents (expected {spec.key(bench.setup)}.json)",
                  file=sys.stderr)
            return 2
        new = bench.run(spec)  # trains into the scratch folder; an error in training is not a mismatch
        try:
            rows = compare(stored, new)
        except ValueError as error:
            print(error, file=sys.stderr)
            return 2
    cells = [[q, f"{a:.7f}", f"{b:.7f}", f"{d:.1e}"] for q, a, b, d in rows]
    print(table(["", "stored", "here", "|difference|"], cells, "lrrr"))
    worst = max(d for *_, d in rows)
    print(f"largest difference {worst:.1e}: " + ("within" if worst <= args.tolerance else "ABOVE")
          + f" the tolerance {args.tolerance:g}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
