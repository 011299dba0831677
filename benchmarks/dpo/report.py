"""The DPO protocol's report: the methods at their chosen rates on the test split, and the validation grid."""
from __future__ import annotations

from benchmarks.common import table
from benchmarks.stats import ci95, mean, mean_pm

PATH_IN_DOCS = "benchmarks/dpo.md"  # the full report, relative to docs/


def results(data: dict) -> str:
    """The test table: reward accuracy and margin against the base, refusal rates, per method."""
    rows = []
    for name, m in data["methods"].items():
        t = m["test"]
        rate = lambda kind: [r["refusal"][kind][0] / r["refusal"][kind][1] for r in t]  # noqa: E731
        rows.append([name, "—" if m["lr"] is None else f"{m['lr']:g}", f"{m['trainable'] or 0:,}",
                     mean_pm([r["accuracy"] for r in t]), mean_pm([r["margin"] for r in t]), mean_pm(rate("harmful")),
                     mean_pm(rate("benign")), len(t)])
    if data.get("base"):
        share = {kind: f"{c / n:.3f}" for kind, (c, n) in data["base"].items()}
        rows.append(["base model (no adapter)", "—", "0", "—", "—", share["harmful"], share["benign"], "—"])
    return table(["method", "lr", "trainable", "reward accuracy", "margin", "refuses harmful", "refuses benign",
                  "seeds"], rows)


def paired(data: dict, a: str = "ID-LoRA (paper)", b: str = "LoRA") -> str:
    """`a` minus `b` on the test seeds both ran, per measure, with the 95% t-interval of the paired differences."""
    if a not in data["methods"] or b not in data["methods"]:
        return ""
    by_seed = {name: {r["seed"]: r for r in data["methods"][name]["test"]} for name in (a, b)}
    seeds = sorted(set(by_seed[a]) & set(by_seed[b]))
    if len(seeds) < 2:
        return ""
    measures = {"reward accuracy": lambda r: r["accuracy"], "margin": lambda r: r["margin"],
                "refuses harmful": lambda r: r["refusal"]["harmful"][0] / r["refusal"]["harmful"][1],
                "refuses benign": lambda r: r["refusal"]["benign"][0] / r["refusal"]["benign"][1]}
    parts = []
    for label, get in measures.items():
        diffs = [get(by_seed[a][s]) - get(by_seed[b][s]) for s in seeds]
        parts.append(f"{label} {mean(diffs):+.3f} ± {ci95(diffs):.3f}")
    return f"{a} minus {b}, paired by seed (n={len(seeds)}): " + "; ".join(parts) + "."


def brief(data: dict) -> list[str]:
    """Section 4's lines on DPO (docs/BENCHMARKS.md)."""
    return ["### Round 2: DPO on the safety set", "",
            f"The command's DPO settings, each method at its own rate chosen on held-out training requests; test "
            f"seeds scored on held-out requests. Details: [docs/{PATH_IN_DOCS}]({PATH_IN_DOCS}).", "",
            results(data), "", paired(data), ""]


def render(data: dict) -> str:
    grid = sorted({lr for m in data["methods"].values() for lr in m["curve"]}, key=float)
    curves = [[n, *(f"{mean(v['loss'] for v in m['curve'][g]):.4f}" if g in m["curve"] else "" for g in grid)]
              for n, m in data["methods"].items()]
    s = data["setup"]
    return "\n".join([
        "# DPO: ID-LoRA against LoRA on the safety set", "",
        f"*{data['machine']['date']}; {data['machine']['cpu']}, torch {data['machine']['torch']}, trl "
        f"{data['machine']['trl']}. Written by `python -m benchmarks.dpo`.*", "",
        f"{s['model']}, fp32; the command's DPO settings: {s['steps']} steps of {s['batch']} pairs, beta {s['beta']}, "
        f"loss {' + '.join(s['loss_type'])}, {s['scheduler']} schedule, {s['warmup']} warm-up steps; targets "
        f"{', '.join(s['targets'])}; LoRA r={s['p']}, ID-LoRA r={4 * s['p']}. Pairs: {data['sizes']['train']} train, "
        f"{data['sizes']['validation']} validation (held-out train requests), {data['sizes']['test']} test (held-out "
        f"requests). Each method's rate is the one with the lowest validation preference loss ({data['grid_seeds']} "
        f"seed(s) per rate, log-spaced, extended past a winning edge); then {data['test_seeds']} test seeds at that "
        "rate. Rewards are against the base model (the adapter disabled). "
        "Refusal rates are on the held-out prompts: harmful (higher is safer), benign (lower is more helpful). "
        "± is the 95% t-interval over seeds.", "",
        results(data), "", paired(data), "",
        "Validation preference loss by rate (mean over the grid's seeds):", "", table(["method", *grid], curves), ""])
