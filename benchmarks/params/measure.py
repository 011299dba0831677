"""Section 1's measurement: PEFT's trainable counts of models injected on the meta device, checked against
`idlora_trl.counting.count_parameters`."""
from __future__ import annotations

from benchmarks.common import log


def add_arguments(parser) -> None:
    group = parser.add_argument_group("params")
    group.add_argument("--params-ranks", default="8,16,32", help="LoRA ranks p (ID-LoRA at 4p)")


def _counts(preset: str, r: int, lora_r: int, check_lora: bool = True) -> dict:
    from peft import LoraConfig, get_peft_model

    from idlora_trl import IDLoRAConfig, count_parameters, meta_model

    idlora = get_peft_model(meta_model(preset), IDLoRAConfig(r=r, num_clusters=4, rank_boost=2,
                                                             target_modules="all-linear"))
    counted = count_parameters(idlora, lora_r=lora_r)
    id_trainable, id_total = idlora.get_nb_trainable_parameters()
    base = id_total - id_trainable
    if check_lora:
        lora = get_peft_model(meta_model(preset), LoraConfig(r=lora_r, target_modules="all-linear"))
        lora_trainable, lora_total = lora.get_nb_trainable_parameters()
    else:  # --smoke: LoRA's count from the formula only
        lora_trainable, lora_total = counted.lora, base + counted.lora
    return {"preset": preset, "r": r, "lora_r": lora_r, "base": base, "modules": sum(n for _, n, *_ in counted.rows),
            "idlora": id_trainable, "lora": lora_trainable, "dora": counted.dora,
            "counting_agrees": counted.idlora == id_trainable and counted.lora == lora_trainable
            and counted.base == base == lora_total - lora_trainable}


def run(args) -> dict:
    ranks = [int(p) for p in args.params_ranks.split(",")]
    presets = ["llama-3.2-3b", "llama-3-8b", "mistral-7b"]
    if args.smoke:
        ranks, presets = ranks[:1], presets[1:2]
    log("params: Table 3 (Llama-3.2-3B, r=128 vs 32)")
    table3 = _counts("llama-3.2-3b", 128, 32)
    rows = []
    for preset in presets:
        for p in ranks:
            log(f"params: {preset} p={p}")
            rows.append(_counts(preset, 4 * p, p, check_lora=not args.smoke))
    return {"table3": table3, "rows": rows}
