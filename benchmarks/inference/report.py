"""Section 6's table and targets, from `measure.run`'s data alone: tokens/s and the ID-LoRA / LoRA ratios."""
from __future__ import annotations

from benchmarks.common import fmt_s, table, target
from benchmarks.stats import median, median_ratio

DECODE_TARGET, SMALL_TARGET = 0.98, 1.05  # issue #22: decode >= 0.98x unmerged LoRA's tokens/s, 1-4 tokens <= 1.05x


def paired(times: dict, key: str, a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b): rounds ran side by side."""
    return median_ratio(times[key][a], times[key][b])


def _rate(times: dict, key: str, name: str, tokens: int) -> str:
    return f"{tokens / median(times[key][name]):.1f}"


def render(data: dict, ctx) -> tuple[str, list]:
    prefill, decode = data["prefill"], data["decode"]
    rows, targets = [], []
    for mode in ("eager", "compiled"):
        times = data.get(mode)
        if times is None:
            continue
        for name in times["prefill_s"]:
            rows.append([name, mode, _rate(times, "prefill_s", name, prefill),
                         _rate(times, "decode1_s", name, decode), _rate(times, "decode8_s", name, 8 * decode),
                         fmt_s(median(times["small_s"][name]))])
        for key, label in (("decode1_s", "batch 1"), ("decode8_s", "batch 8")):
            ratio = 1 / paired(times, key, "ID-LoRA", "LoRA")  # tokens/s ratio
            targets.append(target(f"Decode tokens/s of ID-LoRA / unmerged LoRA, {label}, {mode}",
                                  f">= {DECODE_TARGET:.2f}x", f"{ratio:.3f}x", ratio >= DECODE_TARGET))
        ratio = paired(times, "small_s", "ID-LoRA", "LoRA")
        targets.append(target(f"Forward at 4 tokens, ID-LoRA / LoRA, {mode}", f"<= {SMALL_TARGET:.2f}x",
                              f"{ratio:.3f}x", ratio <= SMALL_TARGET))
    lines = [
        f"{data['model']}, fp32, LoRA r={data['p']} against ID-LoRA r={4 * data['p']} (k=4, rank boost 2) on q,k,v,"
        f"gate,up; {data['rounds']} interleaved rounds after two warm-up runs each. Prefill: {prefill} tokens at "
        f"batch 1. Decode: {decode} greedy steps after a 32-token prompt, with the KV cache. Tokens/s are medians; "
        "the targets' ratios are medians of per-round ratios.", "",
        table(["model", "mode", "prefill tokens/s", "decode tokens/s, batch 1", "decode tokens/s, batch 8",
               "forward at 4 tokens (s)"], rows, "llrrrr")]
    if data.get("compiled_measured"):
        lines += ["", f"(The eager rows were measured on {data['machine']['date']}, the compiled ones on "
                      f"{data['compiled_measured']}.)"]
    if "graph_breaks" in data:
        breaks = ", ".join(f"{name} {count}" for name, count in data["graph_breaks"].items())
        lines += ["", f"Graph breaks (`torch._dynamo.explain`, forward of 4 tokens): {breaks}."]
    return "\n".join(lines), targets
