"""Section 4's budget axis (issue #21): each method's test NLL and accuracy against examples seen, from the stored runs.

Reads every run of one version of the protocol's task set (`docs/benchmarks/quality-runs/*.json` whose setup names
it: `--data`, by default the current `tasks.DATA`), groups them by budget (steps x batch, recorded in each run) and
by method (`named_methods`), and per budget and method:

- chooses the learning rate with the lowest mean validation answer NLL over the grid's seeds (0 and 1); a rate
  is a grid point only when both seeds ran; a choice on the edge of the rates run is marked "edge" (the protocol
  extends the grid past it);
- reads the test runs at that rate (seeds 0-4) and quotes mean +- the 95% t-interval over seeds;
- pairs methods by seed (a seed fixes the training rows and their order for every method) for the differences
  the issue asks for: each ID-LoRA setting minus LoRA, each minus `ID-LoRA (paper)` (also per task, to show where
  a gap sits), and the rule of docs/METHOD.md ("How the defaults are chosen");
- checks the floor of every task (validation NLL below 0.02 or test accuracy above 0.95 for every method).

    python -m benchmarks.quality.budgets    # seconds; writes docs/benchmarks/quality-budgets.{json,md} and the plot
    python -m benchmarks.quality.budgets --data protocol-v3   # the closed protocol-v3: quality-budgets-v3.{json,md}

The runs themselves come from `python -m benchmarks --only quality --quality-steps S --quality-batch B
--methods ... --ablations none --no-diagnosis` (resumable, one JSON per run; `--score-grid-tests` at the largest
budget, where a run trains far longer than its test takes to score).
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys
from collections import defaultdict

from benchmarks.common import STORED, pyplot, read_json, save_plot, table, write_json
from benchmarks.quality import tasks
from benchmarks.quality.runs import acc, method_name, nll
from benchmarks.stats import ci95, mean, mean_pm

RUNS = os.path.join(STORED, "quality-runs")
DOC = os.path.join(STORED, "quality-budgets.md")  # the current task set's report (`doc_path`); its JSON beside it
GRID_SEEDS, TEST_SEEDS, FLOOR_NLL, FLOOR_ACC = 2, 5, 0.02, 0.95
PAPER, LORA = "ID-LoRA (paper)", "LoRA"
CANDIDATES = ("ID-LoRA rms", "ID-LoRA rms, s=8", "ID-LoRA rms, random rows", "ID-LoRA rms, pmrc-qr")
# The protocol's budgets (issue #21) and the methods each must hold; DoRA may stay at the two smaller ones (it has
# tracked LoRA within 0.01), and a candidate that fails the rule's part 2 runs at those two only (item 3), in `plan`.
BUDGETS = {"30x4": True, "60x8": True, "240x8": False}  # budget -> DoRA required
REFERENCES = (LORA, "LoRA r=p/2", PAPER)
DEFAULT_GRID = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)  # measure.py's --grid
# What each version of the task set is (the report and section 4 name it); tasks.py's docstring has the detail.
PROTOCOLS = {
    "protocol-v3": "the built-in tasks with sentiment half negated, plus ISO 3166 country codes from `pycountry`",
    "protocol-v4": "the built-in tasks with sentiment drawn from a real lexicon (`textblob`'s pattern lexicon, "
                   "disjoint by adjective; plain, negated and aspect-based), plus ISO 3166 country codes from "
                   "`pycountry`",
}


def doc_path(data: str) -> str:
    """The report of task set `data`: quality-budgets.md for the current one, quality-budgets-vN.md for a closed one."""
    return DOC if data == tasks.DATA else os.path.join(STORED, f"quality-budgets-{data.split('-')[-1]}.md")


def collect(folder: str = RUNS, data: str = tasks.DATA) -> dict:
    """{budget "SxB": {method: {lr: {seed: record}}}} over the runs of task set `data` in `folder`."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        record = read_json(path)
        setup = record["setup"]
        name = method_name(record, setup["p"])
        if setup.get("data") == data and name is not None:
            out[f"{setup['steps']}x{setup['batch']}"][name][record["lr"]][record["seed"]] = record
    return out


def choose(by_lr: dict) -> tuple[float | None, bool, dict[float, float]]:
    """(chosen rate, on the edge of the rates run (a single rate is on both), validation NLL per grid point)."""
    curve = {lr: mean(nll(seeds[s], "validation") for s in range(GRID_SEEDS))
             for lr, seeds in by_lr.items() if all(s in seeds for s in range(GRID_SEEDS))}
    if not curve:
        return None, False, curve
    best = min(curve, key=curve.get)
    return best, best in (min(curve), max(curve)), curve


def learned(path: str | None = None) -> dict:
    """{candidate: the rule's part 2 (True, False, or None when not measured)}, from slow-start.json."""
    from benchmarks.quality import slow_start  # imports torch: only when the report is written

    path = path or slow_start.PATH
    data = read_json(path) if os.path.isfile(path) else None
    return {c: (slow_start.learns(data, c) if data else None) for c in CANDIDATES}


def summarise(runs: dict, part2: dict | None = None, protocol: str = tasks.DATA) -> dict:
    """The report's data; `part2` is `learned()` (the slow start), given so that tests can fabricate it; `protocol`
    names the task set the runs used."""
    data = {}
    for budget, methods in sorted(runs.items(), key=lambda kv: _examples(kv[0])):
        records = [r for by_lr in methods.values() for seeds in by_lr.values() for r in seeds.values()]
        hours = sum(r.get("train_s", 0) + r.get("validation_s", 0) + r.get("test", {}).get("eval_s", 0)
                    for r in records) / 3600
        first: dict[int, set] = defaultdict(set)  # every adapter starts as the identity: a seed's first loss is shared
        for r in records:
            first[r["seed"]].add(round(r["losses"][0], 4))
        entry = data[budget] = dict(examples=_examples(budget), methods={}, differences={}, floor={},
                                    runs=len(records), hours=hours, paired=all(len(v) == 1 for v in first.values()))
        for name, by_lr in methods.items():
            lr, edge, curve = choose(by_lr)
            tested = [by_lr[lr][s] for s in sorted(by_lr.get(lr, {})) if "test" in by_lr[lr][s]] if lr else []
            first = next(iter(next(iter(by_lr.values())).values()))
            entry["methods"][name] = dict(
                lr=lr, edge=edge, curve={str(k): v for k, v in sorted(curve.items())}, trainable=first["trainable"],
                runs=sum(len(seeds) for seeds in by_lr.values()),
                seeds=[r["seed"] for r in tested], nll=[nll(r) for r in tested], accuracy=[acc(r) for r in tested],
                tasks={t: [acc(r, t) for r in tested] for t in tasks.TASKS},
                task_nll={t: [r["test"]["nll"][t] for r in tested] for t in tasks.TASKS},
                validation_tasks={t: mean(by_lr[lr][s]["validation"]["nll"][t] for s in range(GRID_SEEDS))
                                  for t in tasks.TASKS} if lr in curve else {})
        done = entry["methods"]
        pairs = [(c, LORA) for c in (PAPER, *CANDIDATES)] + [(c, PAPER) for c in CANDIDATES] + [(PAPER, "LoRA r=p/2")]
        for a, b in pairs:
            if a in done and b in done and set(done[a]["seeds"]) & set(done[b]["seeds"]):
                entry["differences"][f"{a} - {b}"] = {m: _paired(done[a], done[b], m) for m in ("nll", "accuracy")}
                entry["differences"][f"{a} - {b}"]["tasks"] = {t: _paired(
                    dict(seeds=done[a]["seeds"], v=done[a]["task_nll"][t]),
                    dict(seeds=done[b]["seeds"], v=done[b]["task_nll"][t]), "v") for t in tasks.TASKS}
        entry["best"] = best(done)
        for t in tasks.TASKS:
            at_floor = [m for m, e in done.items() if e["seeds"] and (
                e["validation_tasks"].get(t, 1) < FLOOR_NLL or mean(e["tasks"][t]) > FLOOR_ACC)]
            tested = [m for m in done.values() if m["seeds"]]
            entry["floor"][t] = dict(at_floor=at_floor, every_method=bool(tested) and len(at_floor) == len(tested))
    return dict(protocol=protocol, runs=sum(len(s) for m in runs.values() for by_lr in m.values()
                                            for s in by_lr.values()), budgets=data, rule=_rule(data, part2 or {}))


def _examples(budget: str) -> int:
    steps, batch = budget.split("x")
    return int(steps) * int(batch)


def best(methods: dict) -> dict | None:
    """Which setting at one budget: the method with the lowest mean test NLL, the methods tied with it (their paired
    NLL difference from it, on 2 or more shared seeds, has 0 inside its 95% interval), and the fewest trainable
    parameters among these; None before two methods have 2 test seeds. A method whose rate is on the edge of its
    grid is left out: its rate is not chosen yet (`--score-grid-tests` scores a grid's runs on test as they come)."""
    tested = {m: e for m, e in methods.items() if len(e["seeds"]) >= 2 and not e.get("edge")}
    if len(tested) < 2:
        return None
    top = min(tested, key=lambda m: mean(tested[m]["nll"]))
    tied = [m for m, e in tested.items() if m == top or (
        len(set(e["seeds"]) & set(tested[top]["seeds"])) >= 2 and outcome(_paired(e, tested[top], "nll")) != "loses")]
    tied.sort(key=lambda m: mean(tested[m]["nll"]))
    fewest = min(tied, key=lambda m: (tested[m]["trainable"], mean(tested[m]["nll"])))
    return dict(method=top, nll=mean(tested[top]["nll"]), tied=tied, fewest=fewest,
                trainable=tested[fewest]["trainable"])


def which_setting(b: dict | None) -> str:
    """`best` in words."""
    if not b:
        return "not measured yet"
    others = ", ".join(f"`{m}`" for m in b["tied"] if m != b["method"])
    return (f"lowest mean test NLL `{b['method']}` ({b['nll']:.3f}); " + (
        f"tied with it in paired test NLL: {others}" if others else "every other method behind it beyond the interval")
            + f"; the fewest parameters among these: `{b['fewest']}` ({b['trainable']:,} trainable).")


def _paired(a: dict, b: dict, metric: str) -> dict:
    shared = sorted(set(a["seeds"]) & set(b["seeds"]))
    diffs = [a[metric][a["seeds"].index(s)] - b[metric][b["seeds"].index(s)] for s in shared]
    return dict(mean=mean(diffs), ci=ci95(diffs), n=len(diffs))


def _rule(data: dict, part2: dict) -> dict:
    """The rule (docs/METHOD.md). Part 1: paired test NLL minus the paper's below 0 at 2+ budgets, above at none;
    part 2 (`part2`, from the slow start): it learns at least half as fast as LoRA on the tiny Llama."""
    out = {}
    for c in CANDIDATES:
        wins, losses, measured = [], [], []
        for budget, entry in data.items():
            d = entry["differences"].get(f"{c} - {PAPER}", {}).get("nll")
            if d and d["n"] >= TEST_SEEDS:
                measured.append(budget)
                {"wins": wins, "loses": losses, "ties": []}[outcome(d)].append(budget)
        part1 = len(wins) >= 2 and not losses
        out[c] = dict(measured=measured, wins=wins, losses=losses, part1=part1, learns=part2.get(c),
                      passes=part1 and part2.get(c) is True)
    return out


def plan(data: dict) -> list[list[str]]:
    """[budget, method, why, what is stored, the command that completes it] for every (budget, method) the
    protocol still lacks, the rule's first: LoRA, DoRA (not at the largest budget), LoRA r=p/2, the paper and the
    candidates that pass part 2; then, for item 3's diagnosis only, the candidates that fail part 2, at the two
    smaller budgets. The grid is planned: at the largest budget 3 rates centred on the previous budget's choice (the
    issue's cost rule), elsewhere 5 (the default grid when there is no choice to centre on); it is widened to every
    rate already stored, so the command resumes those runs and completes the grid around them."""
    rule = [LORA, "DoRA", *REFERENCES[1:], *(c for c, r in data["rule"].items() if r["learns"])]
    diagnosis = [c for c, r in data["rule"].items() if not r["learns"]]
    largest = list(BUDGETS)[-1]
    rows, previous = [], {}
    for budget, dora in BUDGETS.items():
        entry = data["budgets"].get(budget, {"methods": {}})
        for name in rule + diagnosis:
            if (name == "DoRA" and not dora) or (name in diagnosis and budget == largest):
                continue
            e = entry["methods"].get(name)
            if e and len(e["seeds"]) >= TEST_SEEDS and not e["edge"]:
                continue
            stored = [float(lr) for lr in e["curve"]] if e else []
            centre, steps_around = previous.get(name), (-1, 0, 1) if budget == largest else (-2, -1, 0, 1, 2)
            if centre:
                planned = [centre * 2.0 ** i for i in steps_around]
            else:  # nothing to centre on: the default grid, or wait for the previous budget at the largest
                planned = [] if budget == largest else list(DEFAULT_GRID)
            grid = _span(stored + planned)
            have = (f"{_count(e['runs'], 'run')}, {_count(len(stored), 'rate')} on both grid seeds, "
                    f"{_count(len(e['seeds']), 'test seed')}" if e else "nothing")
            steps, batch = budget.split("x")
            # scoring every grid run on test pays only where training costs more than scoring (3 min): at the
            # largest budget (27 min a run); at 30x4 (2 min) it would double a line's time
            command = (f"--quality-steps {steps} --quality-batch {batch} --grid {','.join(f'{g:g}' for g in grid)} "
                       f"--methods '{name}'" + (" --score-grid-tests" if budget == largest else "")
                       if grid else f"after the previous budget's choice for {name}")
            why = "item 3 only (fails part 2)" if name in diagnosis else "budget axis and rule"
            rows.append((name in diagnosis, [budget, name, why, have, f"`{command}`"]))
        previous = {n: e["lr"] for n, e in entry["methods"].items() if e["lr"]}
    return [row for _, row in sorted(rows, key=lambda r: r[0])]  # stable: the rule's rows first, by budget


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _span(rates: list[float]) -> list[float]:
    """Every rate from the lowest to the highest of `rates` by factors of 2 (measure.py reads its factor from the
    first two), so a grid begun with fewer rates resumes to the whole planned grid, not to what it stored."""
    if not rates:
        return []
    low, high = min(rates), max(rates)
    span = [low * 2.0 ** i for i in range(round(math.log2(high / low)) + 1)]
    off = [r for r in rates if not any(math.isclose(r, g) for g in span)]
    if off:
        raise ValueError(f"rates {off} are not {low:g} times a power of 2: the plan cannot write one grid that "
                         "resumes them; run them with their own --grid, or move their JSONs out of quality-runs")
    return span


# ------------------------------------------------------------------------------------------------ report
def render(data: dict, plot: str | None = None) -> str:
    protocol = data["protocol"]
    picture = [f"![test NLL and accuracy against examples seen]({os.path.basename(plot)})", ""] if plot else []
    command = "python -m benchmarks.quality.budgets" + ("" if protocol == tasks.DATA else f" --data {protocol}")
    lines = [f"# Quality against examples seen ({protocol}, {data['runs']} stored runs)", "",
             f"Written by `{command}` from `docs/benchmarks/quality-runs`. The tasks: {PROTOCOLS[protocol]}. Each "
             "method at its own rate, chosen on validation at each budget; test: mean ± 95% t-interval over seeds.",
             ""]
    for budget, entry in data["budgets"].items():
        steps, batch = budget.split("x")
        lines += [f"## {steps} steps x {batch} rows ({entry['examples']} examples)", "",
                  f"{entry['runs']} runs, {entry['hours']:.1f} h of worker time (training and scoring, one worker of "
                  "two on 2 cores). " + ("Pairing checked: every run of a seed starts from the same first loss (the "
                                         "same rows in the same order)." if entry["paired"] else
                                         "**The first losses of one seed differ between runs: the pairing is not "
                                         "valid.**"), ""]
        rows = []
        for name, e in sorted(entry["methods"].items()):
            lr = "—" if e["lr"] is None else f"{e['lr']:g}" + (" (edge)" if e["edge"] else "")
            rows.append([name, lr, f"{e['trainable']:,}", mean_pm(e["nll"]), mean_pm(e["accuracy"]),
                         *[mean_pm(e["tasks"][t]) for t in tasks.TASKS], len(e["seeds"])])
        lines += [table(["method", "lr", "trainable", "test NLL", "accuracy", *tasks.TASKS, "seeds"], rows), ""]
        grid = sorted({lr for e in entry["methods"].values() for lr in e["curve"]}, key=float)
        lines += ["Validation NLL by rate (mean of seeds 0 and 1):", "",
                  table(["method", *grid], [[n, *(f"{e['curve'][g]:.3f}" if g in e["curve"] else "" for g in grid)]
                                            for n, e in sorted(entry["methods"].items())]), ""]
        if entry["differences"]:
            lines += ["Paired differences (a - b, by seed):", "", table(["a - b", "test NLL", "accuracy", "n"], [
                [k, _signed_pm(d["nll"]), _signed_pm(d["accuracy"]), d["nll"]["n"]]
                for k, d in entry["differences"].items()]), "",
                      "The same test NLL differences by task (where a gap sits):", "",
                      table(["a - b", *tasks.TASKS, "n"], [[k, *(_signed_pm(d["tasks"][t]) for t in tasks.TASKS),
                                                           d["nll"]["n"]] for k, d in entry["differences"].items()]),
                      ""]
        floors = [t for t, f in entry["floor"].items() if f["every_method"]]
        lines += [f"Which setting at this budget: {which_setting(entry.get('best'))}", ""]
        lines += [f"Tasks at their floor for every tested method: {', '.join(floors) or 'none'}.", ""]
    word = {True: "yes", False: "no", None: "not measured"}
    passing = [c for c, r in data["rule"].items() if r["passes"]]
    lines += ["## The rule for the default (docs/METHOD.md)", "",
              "Part 1: paired test NLL minus the paper's, below 0 beyond its interval at 2 or more budgets and above "
              "at none. Part 2: on the tiny random Llama it learns at least half as fast as LoRA (slow-start.md); a "
              "candidate that fails part 2 cannot become the default (the protocol runs it for item 3 only).", "",
              table(
                  ["candidate", "budgets measured", "below the paper", "above the paper", "part 1", "part 2 (learns)",
                   "passes"],
                  [[c, ", ".join(r["measured"]) or "none", ", ".join(r["wins"]) or "none",
                    ", ".join(r["losses"]) or "none", word[r["part1"]], word[r["learns"]], word[r["passes"]]]
                   for c, r in data["rule"].items()]), "",
              "Verdict: " + (f"{passing[0]} becomes the default." if len(passing) == 1 else
                             f"several candidates pass ({', '.join(passing)}): see METHOD.md." if passing else
                             "the default stays the paper's setting."), ""]
    if protocol != tasks.DATA:  # a closed task set: nothing is planned for it any more
        lines += ["## Closed", "", f"This task set is closed: the protocol runs on {tasks.DATA} now "
                  f"([{os.path.basename(DOC)}]({os.path.basename(DOC)}); why: `benchmarks/quality/tasks.py`).", ""]
        return "\n".join(lines + picture)
    todo = plan(data)
    lines += ["## What the protocol still lacks", "", "Each line completes with `python -m benchmarks --only quality "
              "--threads 1 --ablations none --no-diagnosis --out /tmp/x.md` followed by its "
              "command:", "",
              table(["budget", "method", "for", "stored", "command"], todo) if todo else "Nothing: it is complete.",
              ""]
    return "\n".join(lines + picture + RESUME)


RESUME = ["## Running and resuming", "",
          "Two workers with one thread each, from a separate worktree (so the code they run does not move), each "
          "with its own lines of the table above; every run is one JSON, so a later invocation skips what is stored. "
          "Copy the new runs into `docs/benchmarks/quality-runs/`, then:", "", "```",
          "python -m benchmarks.quality.budgets   # this page (seconds)",
          "python -m benchmarks --from-json   # docs/BENCHMARKS.md again, section 4 with this summary",
          "```", "",
          "A sitting on another machine first trains one stored run again: `python -m benchmarks.quality.recheck "
          "docs/benchmarks/quality-runs/RUN.json` (2 minutes at 30x4) prints the largest difference in its training "
          "losses and validation NLL. The runs come from two CPU families: on 2026-12-07 an AMD EPYC trained the "
          "Intel Xeon's `ID-LoRA (paper)` run at 1e-3, seed 0, 30x4 again to within 5.5e-6 (the last loss; "
          "validation NLL within 4.9e-6), far inside the spread between seeds, so their runs share the tables.", ""]


def _signed_pm(d: dict) -> str:
    """A paired difference as "+mean ± half-width"; one pair has no interval (the n column says so)."""
    return f"{d['mean']:+.3f}" + (f" ± {d['ci']:.3f}" if d["n"] > 1 else "")


def outcome(d: dict, higher_is_better: bool = False) -> str:
    """A paired difference (a - b): "wins" when its whole interval is on the better side of 0, "loses" when on the
    worse side, else "ties" (the rule's part 1 and section 4's verdicts both read it)."""
    low, high = d["mean"] - d["ci"], d["mean"] + d["ci"]
    better, worse = (low > 0, high < 0) if higher_is_better else (high < 0, low > 0)
    return "wins" if better else "loses" if worse else "ties"


def verdict(d: dict | None, higher_is_better: bool = False) -> str:
    """`outcome` in words, with the difference and its interval."""
    if not d or d["n"] < 2:
        return "not measured"
    return f"{outcome(d, higher_is_better)} ({d['mean']:+.3f} ± {d['ci']:.3f}, n={d['n']})"


def brief(data: dict) -> list[str]:
    """Section 4's summary of the budget axis (docs/BENCHMARKS.md): per budget, each method's test scores and,
    for ID-LoRA, the paired verdicts against LoRA at its own rate (NLL: lower wins; accuracy: higher wins)."""
    rows, any_edge = [], False
    for budget, entry in data["budgets"].items():
        for name, e in sorted(entry["methods"].items()):
            if not e["seeds"]:
                continue
            any_edge = any_edge or bool(e["edge"])
            against = entry["differences"].get(f"{name} - {LORA}", {})
            words = [verdict(against.get("nll")), verdict(against.get("accuracy"), True)] if name.startswith("ID") \
                else ["", ""]
            lr = f"{e['lr']:g}" + (" (edge)" if e["edge"] else "")
            rows.append([budget, name, lr, f"{e['trainable']:,}", mean_pm(e["nll"]), mean_pm(e["accuracy"]), *words,
                         len(e["seeds"])])
    if not rows:
        return []
    doc, tasks_used = os.path.basename(doc_path(data["protocol"])), PROTOCOLS[data["protocol"]]
    return [f"### Round 2: quality against examples seen ({data['protocol']})", "",
            f"{tasks_used[0].upper()}{tasks_used[1:]} (real data, disjoint by entity; "
            "`benchmarks/quality/tasks.py`). Each method at its own rate chosen on validation at each budget; test "
            "mean ± 95% t-interval over seeds; \"against LoRA\" is the paired test difference (ID-LoRA minus LoRA, "
            "by seed)" + ("; a rate marked (edge) is the best of a grid still being extended past it, not chosen yet, "
                          "and its method is left out of \"which setting\"" if any_edge else "")
            + f". Everything per budget, with the grids and the default rule, in [docs/benchmarks/{doc}]"
              f"(benchmarks/{doc}).", "",
            table(["budget", "method", "lr", "trainable", "test NLL", "accuracy", "against LoRA (NLL)",
                   "against LoRA (accuracy)", "seeds"], rows), "",
            "Which setting, per budget (paired by seed; a method is tied when 0 is inside the 95% interval of its "
            "difference from the lowest):", "",
            *[f"- {budget}: {which_setting(entry.get('best'))}" for budget, entry in data["budgets"].items()], ""]


def draw(data: dict, folder: str, filename: str = "quality_budgets.png") -> str | None:
    plt = pyplot()
    if plt is None or not any(e["seeds"] for entry in data["budgets"].values() for e in entry["methods"].values()):
        return None  # nothing tested yet: no picture
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({n for e in data["budgets"].values() for n in e["methods"]})
    for i, name in enumerate(names):
        dodge = 1.04 ** (i - (len(names) - 1) / 2)  # side by side, so the intervals do not hide each other
        points = [(e["examples"] * dodge, e["methods"][name]) for e in data["budgets"].values()
                  if e["methods"].get(name, {}).get("seeds")]
        for ax, metric in zip(axes, ("nll", "accuracy")):
            if points:
                ax.errorbar([x for x, _ in points], [mean(m[metric]) for _, m in points],
                            yerr=[ci95(m[metric]) for _, m in points], marker="o", capsize=3, label=name)
    for ax, label in zip(axes, ("test answer NLL", "test accuracy")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("examples seen (steps x rows)")
        ax.set_ylabel(label)
    if axes[0].lines:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_plot(fig, folder, filename)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.budgets", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=RUNS, help="folder of stored runs")
    parser.add_argument("--data", default=tasks.DATA, choices=sorted(PROTOCOLS),
                        help="the task set whose runs to report (default: the current one, %(default)s)")
    parser.add_argument("--out", default=None, help="the Markdown file (the JSON and the plot go beside it; "
                                                    "default: quality-budgets.md, or quality-budgets-vN.md for a "
                                                    "closed task set)")
    args = parser.parse_args(argv)
    out = args.out or doc_path(args.data)
    data = summarise(collect(args.runs, args.data), learned(), args.data)
    folder, stem = os.path.dirname(os.path.abspath(out)), os.path.splitext(out)[0]
    write_json(stem + ".json", data)
    with open(out, "w") as f:
        f.write(render(data, draw(data, folder, os.path.basename(stem).replace("-", "_") + ".png")) + "\n")
    print(f"wrote {out} ({data['runs']} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
