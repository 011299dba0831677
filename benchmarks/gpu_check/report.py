"""The GPU check's one table (check, value, target, met?) and exit status, from the parts' results alone."""
from __future__ import annotations

from benchmarks.clustering.report import GPU_TARGET_S
from benchmarks.common import table
from benchmarks.inference.report import DECODE_TARGET, SMALL_TARGET, paired
from benchmarks.stats import median
from benchmarks.training.report import FORWARD_TARGET, MEMORY_TARGET, STEP_TARGET

BUDGET_S = 480.0  # the issue's limit: 8 minutes on one H100/H200


def _yes(met) -> str:
    return "-" if met is None else ("yes" if met else "**no**")


def build_rows(data: dict) -> list[list[str]]:
    """The table's rows (check, value, target, met?) from the parts' results (a part may be missing or failed)."""
    rows = []
    tests = data.get("tests")
    if tests is not None:
        ok = tests["failed"] == tests["errors"] == tests["skipped"] == 0 and tests["passed"] > 0
        late = " (timed out)" if tests.get("returncode", 0) is None else ""
        rows.append(["`pytest -m cuda`", f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} "
                     f"errors, {tests['skipped']} skipped{late}", "all pass, none skipped", _yes(ok)])
    cl = data.get("clustering")
    if cl is not None:
        per = "; ".join(f"{row['modules']} {'x'.join(map(str, row['shape']))}: {median(row['seconds']):.3f} s"
                        for row in cl["rows"])
        n = cl["layers"] * sum(row["per_layer"] for row in cl["rows"])
        rows.append([f"clustering, one matrix per Llama-3-8B shape (k={cl['k']}, r={cl['r']}; median)", per, "-",
                     "-"])
        whole, goal = cl["whole"], f"< {GPU_TARGET_S:.0f} s"
        rows.append([f"clustering, all {n} matrices, extrapolated ({cl['layers']} layers x per-layer sum)",
                     f"{cl['estimated_total_s']:.1f} s", goal,
                     _yes(cl["estimated_total_s"] < GPU_TARGET_S) if "seconds" not in whole else "-"])
        if "seconds" in whole and whole["matrices"] == whole["of"]:
            value, met = f"{whole['seconds']:.1f} s", whole["seconds"] < GPU_TARGET_S
        elif "seconds" in whole:
            value, met = f"partial: {whole['matrices']} of {whole['of']} in {whole['seconds']:.1f} s (budget)", None
        else:
            value, met = f"not run: {whole['skipped']}", None
        rows.append([f"clustering, all {n} matrices, timed one by one", value, goal, _yes(met)])
    tr = data.get("training")
    for tname, res in (tr or {}).get("models", {}).items():
        memory = "CUDA peak over a step" if tr["device"] == "cuda" else "saved activations + state"
        for key, goal, what in (("step", STEP_TARGET, "step"), ("forward", FORWARD_TARGET,
                                "no-grad forward"), ("memory", MEMORY_TARGET, memory)):
            lora, dora = res["ratios"]["LoRA"][key], res["ratios"]["DoRA"][key]
            rows.append([f"ID-LoRA / LoRA, {what}, {tname}, bf16", f"{lora:.3f}x (ID-LoRA / DoRA {dora:.3f}x)",
                         f"<= {goal:.2f}x", _yes(lora <= goal)])
    dec = data.get("decode")
    if dec is not None:
        times = dec["times"]
        for key, what in (("decode1_s", "batch 1"), ("decode8_s", "batch 8")):
            ratio = 1 / paired(times, key, "ID-LoRA", "LoRA")
            rows.append([f"decode tokens/s, ID-LoRA / unmerged LoRA, {what}, KV cache, bf16", f"{ratio:.3f}x",
                         f">= {DECODE_TARGET:.2f}x", _yes(ratio >= DECODE_TARGET)])
        ratio = paired(times, "small_s", "ID-LoRA", "LoRA")
        rows.append(["forward at 4 tokens, ID-LoRA / LoRA, bf16", f"{ratio:.3f}x",
                     f"<= {SMALL_TARGET:.2f}x", _yes(ratio <= SMALL_TARGET)])
    for part, error in data.get("errors", {}).items():
        rows.append([f"part {part}", f"crashed: `{error}`", "runs", _yes(False)])
    times = ", ".join(f"{part} {s:.0f} s" for part, s in data.get("part_s", {}).items())
    total = data.get("total_s", 0.0)
    rows.append(["total time", f"{total:.0f} s ({times})", f"< {BUDGET_S:.0f} s", _yes(total < BUDGET_S)])
    return rows


def exit_status(data: dict, smoke: bool) -> int:
    """1 when a CUDA test failed or errored, none passed (outside a smoke run), or a part crashed; else 0."""
    tests = data.get("tests") or {"failed": 0, "errors": 0, "passed": 0}
    bad_tests = tests["failed"] or tests["errors"] or (not smoke and tests["passed"] == 0)
    return 1 if bad_tests or data.get("errors") else 0


def render(data: dict) -> str:
    """The Markdown the check prints and writes: a heading line and the table."""
    smoke = " (smoke sizes: the numbers mean nothing)" if data["smoke"] else ""
    where = f"{data['machine']['cuda'] or 'CPU'}" + smoke
    return f"**GPU check** on {where}, {data['machine']['date']}\n\n" + \
        table(["check", "value", "target", "met?"], data["rows"], "llll") + "\n"
