"""The README's block of the main job: rendered from the stored run (docs/benchmarks/main-job.json) alone."""
from __future__ import annotations

import textwrap
from pathlib import Path

from benchmarks.common import ROOT, STORED
from benchmarks.main_job.measure import PACKAGES

RECORD = Path(STORED) / "main-job.json"
README = Path(ROOT) / "README.md"
BEGIN = "<!-- main-job: written by `python -m benchmarks.main_job` from docs/benchmarks/main-job.json -->"
END = "<!-- /main-job -->"


def render(record: dict) -> str:
    """The README's block: the quoted figures, and exactly what reproduces them."""
    m = record["machine"]
    versions = ", ".join(f"{name} {m[name]}" for name in PACKAGES)
    note = (f"(Measured by `python -m benchmarks.main_job` on {record['date']}, code at {record['commit']}: "
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
