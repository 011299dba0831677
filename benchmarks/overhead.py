"""Section 5: CPU overhead of the `idlora-trl` command (minor page faults and kernel time), issue #12 item 4.

Run it with `python benchmarks/run.py --only overhead` (about 15 minutes on 2 cores: each command twice).

glibc serves every block over 32 MiB (the logits, batch x length x 49,152 floats, and their gradients) with a
fresh `mmap` and returns it on free, so a training step faults its large buffers in again, 4 KiB at a time. The
command sets PyTorch's `THP_MEM_ALLOC_ENABLE=1` at import (`idlora_trl/startup.py`), which backs tensors of
2 MiB and more with transparent huge pages. Each command runs under `/usr/bin/time -v` twice, interleaved:
with `THP_MEM_ALLOC_ENABLE=0` (what the command did before) and as shipped. Same seed, same steps, same losses.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

from common import log, table, target

SYSTEM_SHARE_TARGET = 0.10
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
        commands = {"idlora-trl --help": [sys.executable, "-m", "idlora_trl.cli", "--help"]}
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


def render(data: dict, ctx) -> tuple[str, list]:
    body, targets = [], []
    for row in data["rows"]:
        for label, run_ in (("THP_MEM_ALLOC_ENABLE=0 (before)", row["before"]), ("as shipped", row["after"])):
            share = run_["system_s"] / (run_["system_s"] + run_["user_s"])
            body.append([f"`{row['command']}`", label, f"{run_['minor_faults']:,.0f}", f"{run_['system_s']:.1f}",
                         f"{run_['user_s']:.1f}", f"{100 * share:.1f}%", f"{run_['max_rss_kb'] / 2**20:.2f}"])
        after = row["after"]
        share = after["system_s"] / (after["system_s"] + after["user_s"])
        targets.append(target(f"Kernel time of `{row['command']}` (share of its CPU time)",
                              f"< {100 * SYSTEM_SHARE_TARGET:.0f}%", f"{100 * share:.1f}%",
                              share < SYSTEM_SHARE_TARGET))
    text = [__doc__.split("\n\n", 2)[2].strip().replace("\n", " "), "",
            table(["command", "run", "minor page faults", "system, s", "user, s", "system share", "peak RSS, GiB"],
                  body, "llrrrrr"), ""]
    return "\n".join(text), targets
