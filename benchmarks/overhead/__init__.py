"""Section 5: CPU overhead of the `idlora-trl` command (minor page faults and kernel time), issue #12 item 4.

Run it with `python -m benchmarks --only overhead` (about 15 minutes on 2 cores: each command twice).

Why the command faults, and what it does about it: `report.WHY` (quoted in the doc).
"""
from benchmarks.overhead.measure import add_arguments, run
from benchmarks.overhead.report import render

__all__ = ["add_arguments", "run", "render"]
