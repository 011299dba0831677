"""Section 1's table and targets, from `measure.run`'s data alone: the paper's Table 3 and ID-LoRA's share of LoRA."""
from __future__ import annotations

from benchmarks.common import table, target

PAPER_TABLE3 = {"lora_r32_percent": 1.49, "idlora_r128_percent": 0.77}
PAPER_SHARE_OF_LORA = 54.0  # percent: ID-LoRA (4p) / LoRA (p)


def _pct(n: int, base: int) -> float:
    return 100.0 * n / (base + n)


def render(data: dict, ctx) -> tuple[str, list]:
    t3, rows = data["table3"], data["rows"]
    lora3, id3 = _pct(t3["lora"], t3["base"]), _pct(t3["idlora"], t3["base"])
    out = [
        "Counted on the meta device (no weights): PEFT's own trainable counts of the injected models, "
        "`target_modules=\"all-linear\"` (the seven projections of every decoder layer), ID-LoRA with k=4, f=2 "
        "(rank boosting) and the token router. Percentages are trainable / (base + trainable), as PEFT prints "
        "them; DoRA = LoRA + a d_out magnitude vector per module.",
        "",
        "**The paper's Table 3 (Llama-3.2-3B)**",
        "",
        table(["method", "trainable", "% (ours)", "% (paper)", "agrees"], [
            [f"LoRA r={t3['lora_r']}", f"{t3['lora']:,}", f"{lora3:.2f}%", f"{PAPER_TABLE3['lora_r32_percent']:.2f}%",
             "yes" if round(lora3, 2) == PAPER_TABLE3["lora_r32_percent"] else "no"],
            [f"ID-LoRA r={t3['r']}", f"{t3['idlora']:,}", f"{id3:.2f}%",
             f"{PAPER_TABLE3['idlora_r128_percent']:.2f}%",
             "yes" if round(id3, 2) == PAPER_TABLE3["idlora_r128_percent"] else "no"],
        ]),
        "",
        f"Base model: {t3['base']:,} parameters. ID-LoRA trains {t3['idlora'] / t3['lora']:.1%} of LoRA's parameters.",
        "",
        "**ID-LoRA at rank 4p against LoRA and DoRA at rank p**",
        "",
    ]
    body = []
    for row in rows:
        b = row["base"]
        body.append([row["preset"], row["lora_r"], f"{row['lora']:,} ({_pct(row['lora'], b):.2f}%)",
                     f"{row['dora']:,} ({_pct(row['dora'], b):.2f}%)", row["r"],
                     f"{row['idlora']:,} ({_pct(row['idlora'], b):.2f}%)", f"{row['idlora'] / row['lora']:.1%}"])
    out += [table(["model", "p", "LoRA r=p", "DoRA r=p", "ID-LoRA r", "ID-LoRA r=4p", "ID-LoRA / LoRA"], body,
                  "lrrrrrr"), ""]
    agree = all(r["counting_agrees"] for r in [t3] + rows)
    out.append(f"`idlora_trl.counting.count_parameters` (what `idlora-trl count` prints) "
               f"{'agrees with PEFT on every row' if agree else '**disagrees with PEFT on some rows**'}.")
    shares = [100.0 * r["idlora"] / r["lora"] for r in rows]
    paper_models = [100.0 * r["idlora"] / r["lora"] for r in rows if r["preset"] != "llama-3.2-3b"] or shares
    lo, hi = min(paper_models), max(paper_models)
    out += ["", f"ID-LoRA's share of LoRA does not depend on p (both grow linearly in it): "
            f"{lo:.1f}%{'' if abs(hi - lo) < 0.05 else f'-{hi:.1f}%'} on the Llama-3-8B / Mistral-7B shapes "
            f"(the paper says {PAPER_SHARE_OF_LORA:.0f}%, i.e. \"up to 46% fewer\"). Per module, LoRA trains "
            "p (d_in + d_out) and ID-LoRA with f=2 trains d_out p + 4p, so the share is "
            "(sum(d_out) + 4 * modules) / sum(d_in + d_out): it is set by the shapes alone."]
    targets = [
        target("Table 3: LoRA r=32 on Llama-3.2-3B", f"{PAPER_TABLE3['lora_r32_percent']:.2f}%", f"{lora3:.2f}%",
               round(lora3, 2) == PAPER_TABLE3["lora_r32_percent"]),
        target("Table 3: ID-LoRA r=128 on Llama-3.2-3B", f"{PAPER_TABLE3['idlora_r128_percent']:.2f}%",
               f"{id3:.2f}%", round(id3, 2) == PAPER_TABLE3["idlora_r128_percent"]),
        target("ID-LoRA (4p) / LoRA (p), Llama-3-8B and Mistral-7B", f"<= {PAPER_SHARE_OF_LORA:.0f}% (paper)",
               f"{hi:.1f}%", hi <= PAPER_SHARE_OF_LORA + 0.5),
    ]
    return "\n".join(out), targets
