"""`python -m benchmarks.main_job [--render]`: run the main job, store its figures, rewrite the README's block."""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import ROOT
from benchmarks.main_job import __doc__ as DOC
from benchmarks.main_job.measure import figures, machine, run_job
from benchmarks.main_job.report import RECORD, write_readme


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.main_job", description=DOC.split("\n\n")[0])
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
    print(f"README.md: main-job block written from {RECORD.relative_to(Path(ROOT))}")


main()
