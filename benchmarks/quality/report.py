"""Section 4's tables, from `measure.run`'s data alone (`--from-json`): the methods at their chosen rates, the grid,
the ablations, the paper's claim and the reviewers' questions with 95% intervals, and the diagnosis."""
from __future__ import annotations

import math

from benchmarks.common import pyplot, save_plot, table
from benchmarks.quality.runs import acc, nll
from benchmarks.stats import ci95, mean, mean_pm, welch


def verdict(a: list[dict], b: list[dict], metric, higher_is_better: bool = True) -> str:
    """`metric` of runs `a` minus that of runs `b`, with a 95% interval of the difference.

    Runs with the same seed see the same training rows in the same order (`data_seed`), so where both sides
    share at least two seeds the difference is taken seed by seed (a paired t-interval): the data order, the
    largest source of spread at this budget, cancels out. Otherwise Welch's interval of two independent means.
    """
    by_seed_a, by_seed_b = {r["seed"]: metric(r) for r in a}, {r["seed"]: metric(r) for r in b}
    common = sorted(set(by_seed_a) & set(by_seed_b))
    if len(common) >= 2:
        diffs = [by_seed_a[s] - by_seed_b[s] for s in common]
        d, half, how = mean(diffs), ci95(diffs), f"paired, n={len(common)}"
    else:
        (d, half), how = welch(list(by_seed_a.values()), list(by_seed_b.values())), "Welch"
    if math.isnan(half):
        return f"{d:+.3f} (too few seeds for an interval)"
    if abs(d) <= half:
        return f"{d:+.3f} ± {half:.3f} ({how}): no difference this protocol can tell"
    better = (d > 0) == higher_is_better
    return f"{d:+.3f} ± {half:.3f} ({how}): {'better' if better else 'worse'}, beyond the interval"


def _tested(entry: dict) -> list[dict]:
    return [r for r in entry.get("runs", []) if "test" in r]


def _plot(data: dict, plot_dir) -> str | None:
    plt = pyplot()
    if plt is None or not data["main"]:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for method, entry in data["main"].items():
        lrs = sorted(entry["curve"], key=float)
        if lrs:
            ys = [mean(entry["curve"][lr]) for lr in lrs]
            ax.plot([float(lr) for lr in lrs], ys, marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xticks(sorted({float(lr) for e in data["main"].values() for lr in e["curve"]}))
    ax.set_xticklabels([f"{t:g}" for t in ax.get_xticks()], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation answer NLL (nats/token)")
    ax.set_title("Learning-rate grid (mean over seeds; lower is better)", fontsize=9)
    ax.legend(fontsize=8)
    return save_plot(fig, plot_dir, "quality_grid.png")


def render(data: dict, ctx) -> tuple[str, list]:
    s = data["setup"]
    tasks = None
    out = [f"{s['model']}, fp32; targets {', '.join(s['targets'])} (the main job's); {s['steps']} steps of batch "
           f"{s['batch']}, max length {s['max_length']}, {s['scheduler']} schedule, {s['warmup']} warm-up steps, "
           f"AdamW. LoRA and DoRA at r={s['p']} (lora_alpha={2 * s['p']}), VeRA at r={32 * s['p']}, ID-LoRA at "
           f"r={4 * s['p']} with the library's defaults. Learning rate per method from the grid "
           f"{', '.join(f'{g:g}' for g in data['grid'])} ({data['grid_seeds']} seeds per point, extended past a "
           f"winning edge), chosen on the validation split's answer NLL ({s['validation']} items); then "
           f"{data['test_seeds']} seeds at that rate, scored on {s['test']} test items. ± is the 95% t-interval "
           "of the mean over seeds.", ""]
    first = {}
    for entry in [*data["main"].values(), *data["ablations"].values()]:
        for r in _tested(entry):
            first.setdefault(r["seed"], set()).add(round(r["losses"][0], 4))
    if first:
        same = all(len(v) == 1 for v in first.values())
        out[-2] += (" A seed fixes the training rows and their order for every method (`data_seed`): "
                    + ("checked, every run of a seed starts from the same first loss." if same else
                       "**but the first losses of one seed differ between runs: the pairing below is not valid.**"))
    if not data.get("complete", True):
        out += ["**Partial: the protocol stopped at its time budget; the rows below hold the runs done so far "
                "(run it again to resume).**", ""]
    rows, lora = [], data["main"].get("LoRA", {}).get("trainable")
    for method, entry in data["main"].items():
        runs = _tested(entry)
        if runs:
            tasks = tasks or list(runs[0]["test"]["accuracy"])
        share = f" ({entry['trainable'] / lora:.0%})" if lora and entry.get("trainable") else ""
        rows.append([method, f"{entry['lr']:g}" if entry.get("lr") else "not chosen yet",
                     f"{entry['trainable']:,}{share}" if entry.get("trainable") else "-",
                     *(mean_pm([acc(r, t) for r in runs]) for t in tasks or []), mean_pm([acc(r) for r in runs]),
                     mean_pm([nll(r) for r in runs]), len(runs)])
    tasks = tasks or []
    out += [table(["method", "chosen lr", "trainable (of LoRA)", *tasks, "mean accuracy", "answer NLL", "seeds"],
                  [row if len(row) == 6 + len(tasks) else row[:3] + ["-"] * len(tasks) + row[3:] for row in rows],
                  "llr" + "r" * (len(tasks) + 3)), ""]
    out += _comparison(data)
    out += ["**The learning-rate grid** (validation answer NLL, mean over seeds; the chosen rate in bold)", ""]
    lrs = sorted({lr for e in data["main"].values() for lr in e["curve"]}, key=float)
    out += [table(["method", *(f"{float(lr):g}" for lr in lrs)],
                  [[m, *(_grid_cell(e, lr) for lr in lrs)] for m, e in data["main"].items()], "l" + "r" * len(lrs)), ""]
    plot = None if ctx.plot_dir is None else _plot(data, ctx.plot_dir)
    if plot:
        out += [f"![learning-rate grid]({ctx.plot_rel}/{plot})", ""]
    out += _ablations(data, tasks)
    out += _questions(data)
    out += _exploration(data)
    out += _round_two()
    if data.get("diagnosis"):
        out += ["### Diagnosis", ""] + diagnosis(data["diagnosis"])
    return "\n".join(out), []


def _round_two() -> list[str]:
    """The budget axis (`budgets.py`, each task set's report) and the DPO protocol (`benchmarks/dpo`), from their
    stored JSON when written."""
    import os

    from benchmarks.common import STORED, read_json
    from benchmarks.dpo import report as dpo
    from benchmarks.quality import budgets

    dpo_path = os.path.join(STORED, "dpo.json")
    lines = []
    for protocol in sorted(budgets.PROTOCOLS, reverse=True):  # the current task set first, then the closed ones
        path = os.path.splitext(budgets.doc_path(protocol))[0] + ".json"
        lines += budgets.brief(read_json(path)) if os.path.isfile(path) else []
    return lines + (dpo.brief(read_json(dpo_path)) if os.path.isfile(dpo_path) else [])


def _grid_cell(entry: dict, lr: str) -> str:
    values = entry["curve"].get(lr)
    if not values:
        return "-"
    text = f"{mean(values):.4f}" + (f" (n={len(values)})" if len(values) != 2 else "")
    return f"**{text}**" if entry.get("lr") is not None and float(lr) == entry["lr"] else text


def _comparison(data: dict) -> list[str]:
    idl, lora = _tested(data["main"].get("ID-LoRA", {})), _tested(data["main"].get("LoRA", {}))
    if not idl or not lora:
        return []
    return ["**ID-LoRA against LoRA** (ID-LoRA minus LoRA, with the 95% interval of the difference; see below): "
            f"mean test accuracy {verdict(idl, lora, acc)}; answer NLL {verdict(idl, lora, nll, False)}.", ""]


def _ablations(data: dict, tasks: list[str]) -> list[str]:
    default = _tested(data["main"].get("ID-LoRA", {}))
    if not data["ablations"] or not default:
        return []
    rows = [["default", f"{data['main']['ID-LoRA']['lr']:g}", *(mean_pm([acc(r, t) for r in default]) for t in tasks),
             mean_pm([acc(r) for r in default]), mean_pm([nll(r) for r in default]), "-", "-", len(default)]]
    for name, entry in data["ablations"].items():
        runs = _tested(entry)
        rows.append([name, f"{entry['lr']:g}" if entry.get("lr") else "-",
                     *(mean_pm([acc(r, t) for r in runs]) for t in tasks), mean_pm([acc(r) for r in runs]),
                     mean_pm([nll(r) for r in runs]),
                     verdict(runs, default, acc) if runs else "-", verdict(runs, default, nll, False) if runs else "-",
                     len(runs)])
    return [f"**ID-LoRA ablations** (one setting changed each, each at its own best rate from the grid around the "
            f"default's, {data.get('ablation_grid_seeds', 1)} seed(s) per grid point; {data['ablation_seeds']} test "
            "seeds; Δ = variant minus default with its 95% interval)",
            "", table(["variant", "lr", *tasks, "mean accuracy", "answer NLL", "Δ accuracy", "Δ NLL", "seeds"], rows,
                      "ll" + "r" * (len(tasks) + 2) + "llr"), ""]


def _versus(data: dict, a: list[dict], b: list[dict], what: str) -> str:
    if not a or not b:
        return f"{what}: not measured yet (resume the protocol)."
    return f"{what}: accuracy {verdict(a, b, acc)}; answer NLL {verdict(a, b, nll, False)}."


def _questions(data: dict) -> list[str]:
    """The paper's claim and the reviewers' questions, answered from the runs (95% intervals, `verdict`)."""
    main, abl = data["main"], data["ablations"]
    idl, lora = _tested(main.get("ID-LoRA", {})), _tested(main.get("LoRA", {}))
    run = {name: _tested(entry) for name, entry in abl.items()}
    k8 = next((n for n in run if n.startswith("k=8")), None)
    control = next((n for n in run if n.startswith("k=4, r=")), None)
    share = (f", with {main['ID-LoRA']['trainable'] / main['LoRA']['trainable']:.0%} of LoRA's trainable parameters,"
             if main.get("ID-LoRA", {}).get("trainable") and main.get("LoRA", {}).get("trainable") else "")
    lines = [_versus(data, idl, lora, f"*The paper's claim* (ID-LoRA{share} against LoRA; ID-LoRA minus LoRA)")]
    for other in ("DoRA", "VeRA"):
        if _tested(main.get(other, {})):
            lines.append(_versus(data, idl, _tested(main[other]), f"*ID-LoRA against {other}* (ID-LoRA minus {other})"))
    asked = [("router=static", "*Does a static router do as well as the token router?* (static minus token)"),
             ("selection=random", "*Does PMRC beat random rows?* (random minus PMRC)"),
             ("selection=sequential", "*Does PMRC beat sequential rows?* (sequential minus PMRC)"),
             ("rank_boost=1", "*Rank boosting* (f=1, four times the parameters, minus f=2)"),
             ("k=2", "*Sensitivity to k*: k=2 minus k=4")]
    lines += [_versus(data, run.get(name, []), idl, text) for name, text in asked]
    if k8:
        lines.append(_versus(data, run[k8], run.get(control, []) if control else idl,
                             f"*Sensitivity to k*: {k8} minus "
                             + (f"{control} (same rank)" if control else "the default")))
    lines += [_versus(data, run.get(name, []), idl, f"*Ours*: {name} minus the default")
              for name in run if "(ours)" in name]
    return ["**The paper's claim and the reviewers' questions** (differences over test seeds, each method or variant "
            "at its own chosen rate, with a 95% interval: paired by seed where both sides share seeds, since a seed "
            "fixes the training rows and their order for every method; Welch's otherwise)", "",
            *(f"- {line}" for line in lines), ""]


def _exploration(data: dict) -> list[str]:
    """Single-seed runs at the main job's own size (60 steps of 8), kept to check that the rates transfer."""
    runs = data.get("exploration") or []
    if not runs:
        return []
    tasks = list(runs[0]["validation"]["nll"])
    rows = [[r["label"], f"{r['lr']:g}", f"{r['setup']['steps']} x {r['setup']['batch']}",
             *(f"{r['validation']['nll'][t]:.3f}" for t in tasks), f"{nll(r, 'validation'):.3f}"]
            for r in sorted(runs, key=lambda r: (r["label"], r["lr"]))]
    return ["**At the main job's size** (60 steps of 8 rows, seed 0 only, validation answer NLL; "
            "`docs/benchmarks/exploration/`): do the rates chosen above carry over to the main job?", "",
            table(["run", "lr", "steps x batch", *tasks, "mean"], rows, "lll" + "r" * (len(tasks) + 1)), ""]


def diagnosis(data: dict) -> list[str]:
    """The tables of `diagnose.run`'s data."""
    out = ["**Skeleton conditioning** (median over layers; rows: the `k r` selected rows of `W`; x: the gathered "
           f"activations on {data['rows']} training rows' tokens)", "",
           table(["module", "selection", "rows: condition number", "rows: effective rank", "x: condition number",
                  "x: effective rank"],
                 [[c["module"], c["selection"], f"{c['rows_cond']:.1f}", f"{c['rows_erank']:.1f}",
                   f"{c['x_cond']:.0f}", f"{c['x_erank']:.1f}"] for c in data["conditioning"]], "llrrrr"), ""]
    out += ["**Router at initialisation** (`B = 0`; rms over tokens and entries, median over layers; |alpha| "
            "quantiles over every token of the module type)", "",
            table(["variant", "module", "rms(x)", "rms(s v)", "median abs(alpha)", "p99 abs(alpha)",
                   "max abs(grad T)", "max abs(grad B)"],
                  [[r["variant"], r["module"], f"{r['x_rms']:.3f}", f"{r['v_rms']:.3f}", f"{r['alpha_median']:.4f}",
                    f"{r['alpha_p99']:.4f}", f"{r['max_T_grad']:.1e}", f"{r['max_B_grad']:.1e}"]
                   for r in data["router"]], "llrrrrrr"), ""]
    out += [f"**Update size after one AdamW step** (lr {data['lr']:g}): rms(delta y) / rms(y) per module, median "
            "and largest over layers", "",
            table(["method", "module", "median", "max"],
                  [[u["method"], u["module"], f"{u['median']:.5f}", f"{u['max']:.5f}"] for u in data["update"]],
                  "llrr"), ""]
    if data.get("trained"):
        out += ["**Update size at the end of training** (the seed-0 adapter of each method, and of each ablation "
                "that changes the router, at its own chosen rate): "
                "rms(delta y) / rms(y) per module, median and largest over layers", "",
                table(["method", "module", "median", "max"],
                      [[u["method"], u["module"], f"{u['median']:.4f}", f"{u['max']:.4f}"] for u in data["trained"]],
                      "llrr"), ""]
    return out
