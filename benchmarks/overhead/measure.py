"""Section 5's measurement: each `idlora-trl` command under `/usr/bin/time -v`, with THP_MEM_ALLOC_ENABLE=0 and as
shipped, interleaved."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

from benchmarks.common import log

COMMANDS = {
    "sft": ["sft", "--max_steps", "20", "--eval_samples", "8"],
    "dpo": ["dpo", "--max_steps", "20"],
}
FIELDS = {"minor_faults": "Minor (reclaiming a frame) page faults", "system_s": "System time (seconds)",
          "user_s": "User time (seconds)", "max_rss_kb": "Maximum resident set size (kbytes)"}


def add_arguments(parser) -> None:
    group = parser.add_argument_group("overhead")
    group.add_argument("--overhead-commands", default="sft,dpo", help="idlora-trl subcommands to measure")


def parse_time_v(text: str) -> dict:
    """The fields of `/usr/bin/time -v` this section reports (faults, user/system seconds, peak RSS)."""
    out = {}
    for key, label in FIELDS.items():
        match = re.search(rf"^\s*{re.escape(label)}:\s*([0-9.]+)\s*$", text, re.M)
        if match is None:
            raise ValueError(f"`/usr/bin/time -v` output has no {label!r} line")
        out[key] = float(match.group(1))
    return out


def measure(argv: list[str], thp: str | None) -> dict:
    """One run of `argv` under `/usr/bin/time -v`; `thp` is THP_MEM_ALLOC_ENABLE ("0", or None: as shipped)."""
    env = dict(os.environ)
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    if thp is not None:
        env["THP_MEM_ALLOC_ENABLE"] = thp
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "time.txt")
        subprocess.run(["/usr/bin/time", "-v", "-o", report, *argv], check=True, env=env, cwd=tmp,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(report, encoding="utf-8") as handle:
            return parse_time_v(handle.read())


def run(args) -> dict:
    if shutil.which("/usr/bin/time") is None:
        raise RuntimeError("/usr/bin/time is not installed (Debian: apt-get install time)")
    if args.smoke:  # the same code path on the command's help screen instead of a training run
        commands = {"idlora-trl --help": [sys.executable, "-m", "idlora_trl_app.cli", "--help"]}
    else:
        command = shutil.which("idlora-trl") or os.path.join(os.path.dirname(sys.executable), "idlora-trl")
        names = [n.strip() for n in args.overhead_commands.split(",") if n.strip()]
        commands = {f"idlora-trl {' '.join(COMMANDS[n])}": [command, *COMMANDS[n], "--output_dir", "out"]
                    for n in names}
    rows = []
    for name, argv in commands.items():
        before = measure(argv, "0")
        after = measure(argv, None)
        log(f"overhead: {name}: faults {before['minor_faults']:.0f} -> {after['minor_faults']:.0f}")
        rows.append({"command": name, "before": before, "after": after})
    return {"rows": rows}
