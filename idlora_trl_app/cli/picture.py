"""A picture of a training run: `run.png` in the output folder, written by `idlora-trl sft` / `dpo` at the end.

Panels: the training loss over steps (and the evaluation loss, with --eval_strategy); for DPO, the reward margin and
accuracy over steps; the held-out figures per task (SFT accuracy) or per kind of prompt (DPO refusal rate) before and
after training. Drawn with matplotlib's Agg canvas (no display, no global pyplot state).
"""

from __future__ import annotations

import os
from typing import Optional

FILE_NAME = "run.png"


def _series(logs: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(log["step"], log[key]) for log in logs if key in log and "step" in log]
    return [p[0] for p in points], [p[1] for p in points]


MISSING = ("no picture of the run: matplotlib is not installed (pip install 'idlora-trl[plot]', or --no_plot to "
           "skip the picture)")


def write_picture(command: str, output_dir: str, logs: list[dict], metric: str, before: dict,
                  after: dict) -> Optional[str]:
    """Draw the run of `idlora-trl COMMAND` into `<output_dir>/run.png` and return its absolute path; None without
    matplotlib (an optional dependency, the `plot` extra), after saying so."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from .printing import say

        say(MISSING)
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpo = command == "dpo"
    panels = 3 if dpo else 2
    figure = Figure(figsize=(5.2 * panels, 4.0), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels)
    title = f"idlora-trl {command}: {os.path.basename(os.path.normpath(output_dir))}"
    figure.suptitle(title)

    loss = axes[0]
    steps, values = _series(logs, "loss")
    loss.plot(steps, values, marker="o", markersize=3, label="training loss")
    steps, values = _series(logs, "eval_loss")
    if steps:
        loss.plot(steps, values, marker="s", markersize=3, label="evaluation loss")
    loss.set(xlabel="step", ylabel="loss", title="Loss")
    loss.grid(alpha=0.3)
    loss.legend()

    if dpo:
        rewards = axes[1]
        for key, label in (("rewards/margins", "reward margin"), ("rewards/accuracies", "reward accuracy")):
            steps, values = _series(logs, key)
            rewards.plot(steps, values, marker="o", markersize=3, label=label)
        rewards.axhline(0.0, color="grey", linewidth=0.8)
        rewards.set(xlabel="step", title="Rewards (chosen - rejected)")
        rewards.grid(alpha=0.3)
        rewards.legend()

    held_out = axes[-1]
    names = list(before)
    if names:
        x = range(len(names))
        width = 0.38
        b = [before[n].accuracy for n in names]
        a = [after[n].accuracy if n in after else 0.0 for n in names]
        bars_b = held_out.bar([i - width / 2 for i in x], b, width, label="before")
        bars_a = held_out.bar([i + width / 2 for i in x], a, width, label="after")
        for bars in (bars_b, bars_a):
            held_out.bar_label(bars, fmt="%.2f", fontsize=8)
        held_out.set_xticks(list(x), [f"{n}\n(n={before[n].total})" for n in names])
        held_out.set_ylim(0, 1.1)
        held_out.legend()
    else:
        held_out.text(0.5, 0.5, "no held-out evaluation\n(--eval_samples 0, or --deepspeed)", ha="center",
                      va="center", transform=held_out.transAxes)
        held_out.set_xticks([])
    held_out.set(title=f"{metric[:1].upper()}{metric[1:]}, before and after", ylabel=metric)  # "held-out accuracy"

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(output_dir, FILE_NAME))
    canvas.print_png(path)
    return path
