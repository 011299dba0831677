"""Section 5's table and target, from `measure.run`'s data alone: page faults, kernel time and peak memory."""
from __future__ import annotations

from benchmarks.common import table, target

SYSTEM_SHARE_TARGET = 0.10
WHY = ('glibc serves every block over 32 MiB (the logits, batch x length x 49,152 floats, and their gradients) with a '
       'fresh `mmap` and returns it on free, so a training step faults its large buffers in again, 4 KiB at a time. '
       "The command sets PyTorch's `THP_MEM_ALLOC_ENABLE=1` at import (`idlora_trl_app/startup.py`), which backs "
       'tensors of 2 MiB and more with transparent huge pages. Each command runs under `/usr/bin/time -v` twice, '
       'interleaved: with `THP_MEM_ALLOC_ENABLE=0` (what the command did before) and as shipped. Same seed, same '
       'steps, same losses.')


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
    text = [WHY, "",
            table(["command", "run", "minor page faults", "system, s", "user, s", "system share", "peak RSS, GiB"],
                  body, "llrrrrr"), ""]
    return "\n".join(text), targets
