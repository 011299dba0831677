"""Part of section 4 (issue #21, item 3): why the default ID-LoRA hardly learns where activations are small.

A randomly initialised tiny Llama (hidden 64, 2 layers, `initializer_range` 0.02: small weights, so small
skeleton outputs `x = W h`) trains on a fixed set of 64 rows of 16 random tokens (8 rows a step, AdamW, constant
rate), and the training loss on those rows is read after 30 and 120 steps, for LoRA r=4 (lora_alpha 8) and
ID-LoRA r=16, k=2 with the settings `IDLoRAConfig` offers, 5 seeds each (model, router and data). Beside it, the
scale of what each method feeds its trained matrix `B` at initialisation, on the first layer's q_proj: LoRA's
`A h`, ID-LoRA's `v = sum_i alpha_i x_i`, with the rms of the layer input `h` and of the gathered `x`. With AdamW
each step moves `B` by about the rate whatever the gradient's size, so the change of the output per step scales
with `s * rms(v)` (LoRA: `s * rms(A h)`): that product, not the rate, decides how fast the loss falls here.

    python -m benchmarks.quality.slow_start            # ~5 min on 2 cores; writes docs/benchmarks/slow-start.{json,md}
    python -m benchmarks.quality.slow_start --render   # the Markdown again, from the JSON
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from benchmarks.common import STORED, machine_info, read_json, table, tiny_llama, write_json
from benchmarks.stats import ci95, mean

PATH = os.path.join(STORED, "slow-start.json")
DOC = os.path.join(STORED, "slow-start.md")
TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
VOCAB, ROWS, LENGTH, BATCH = 128, 64, 16, 8
SEEDS, RATES, STEPS = 5, (1e-2, 3e-2), (30, 120)
METHODS = {  # label -> (kind, config overrides); the candidates carry the protocol's names (runs.named_methods)
    "LoRA r=4": ("lora", {}),
    "ID-LoRA (paper)": ("idlora", {"router_norm": "none", "selection": "pmrc"}),
    "ID-LoRA (paper), init_router_std=1": ("idlora", {"router_norm": "none", "init_router_std": 1.0}),
    "ID-LoRA rms": ("idlora", {"router_norm": "rms"}),
    "ID-LoRA rms, init_router_std=1": ("idlora", {"router_norm": "rms", "init_router_std": 1.0}),
    "ID-LoRA rms, s=8": ("idlora", {"router_norm": "rms", "idlora_alpha": 8 * 16}),
    "ID-LoRA rms, random rows": ("idlora", {"router_norm": "rms", "selection": "random"}),
    "ID-LoRA rms, pmrc-qr": ("idlora", {"router_norm": "rms", "selection": "pmrc-qr"}),
}
LEARNS_RATE, LEARNS_SHARE = 1e-2, 0.5  # the rule's part 2 (docs/METHOD.md): at LoRA's better rate, both step counts


def learns(data: dict, label: str) -> bool | None:
    """Part 2 of the default rule: the mean loss drop, paired by seed, is at least half of LoRA's at 30 and at 120
    steps, at lr 1e-2 (where LoRA learns most here). None when `label` was not measured."""
    if label not in data["runs"]:
        return None
    lora, run = data["runs"]["LoRA r=4"]["rates"][str(LEARNS_RATE)], data["runs"][label]["rates"][str(LEARNS_RATE)]
    return all(mean(drop(c, s) / drop(ref, s) for c, ref in zip(run, lora)) >= LEARNS_SHARE for s in data["steps"])


def config(kind: str, overrides: dict):
    from peft import LoraConfig

    from idlora_trl import IDLoRAConfig

    if kind == "lora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", **overrides)
    return IDLoRAConfig(r=16, num_clusters=2, target_modules=TARGETS, task_type="CAUSAL_LM", **overrides)


def rows(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (ROWS, LENGTH), generator=torch.Generator().manual_seed(seed))


def losses(kind: str, overrides: dict, lr: float, seed: int) -> dict:
    """Training loss on all rows before training and after each of STEPS steps."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(vocab=VOCAB, hidden=64, layers=2, seed=seed).train(), config(kind, overrides))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    data = rows(seed)

    def loss_on_all() -> float:
        with torch.no_grad():
            return model(input_ids=data, labels=data).loss.item()

    out = {"0": loss_on_all()}
    for step in range(1, max(STEPS) + 1):
        start = (step - 1) * BATCH % ROWS
        batch = data[start:start + BATCH]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in STEPS:
            out[str(step)] = loss_on_all()
    return out


def scales(kind: str, overrides: dict) -> dict:
    """rms of the first layer's q_proj input `h`, of `x = W h` at the skeleton rows, and of what `B` multiplies."""
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(vocab=VOCAB, hidden=64, layers=2, seed=0), config(kind, overrides))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    seen = {}

    def hook(module, args, output):
        h = args[0].reshape(-1, args[0].shape[-1])
        seen["h"] = h.pow(2).mean().sqrt().item()
        if kind == "lora":
            seen["into_B"] = module.lora_A["default"](h).pow(2).mean().sqrt().item()
            seen["s"] = module.scaling["default"]
            return
        indices = module.idlora_indices["default"]
        x = module.base_layer(h)[:, indices.flatten()].view(-1, *indices.shape)
        v = module.idlora_variant["default"].mix(x, module.idlora_T["default"].weight.view(-1))[0]
        seen.update(x=x.pow(2).mean().sqrt().item(), into_B=v.pow(2).mean().sqrt().item(),
                    s=module.scaling["default"])

    handle = layer.register_forward_hook(hook)
    with torch.no_grad():
        model(input_ids=rows(0)[:BATCH])
    handle.remove()
    return seen


def measure() -> dict:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    runs = {}
    for label, (kind, overrides) in METHODS.items():
        runs[label] = {"scales": scales(kind, overrides), "rates": {}}
        for lr in RATES:
            runs[label]["rates"][str(lr)] = [losses(kind, overrides, lr, seed) for seed in range(SEEDS)]
            print(f"  {label}, lr {lr}: done", file=sys.stderr, flush=True)
    return {"machine": machine_info(), "seeds": SEEDS, "rates": list(RATES), "steps": list(STEPS), "runs": runs}


def drop(curve: dict, steps: int) -> float:
    return (curve["0"] - curve[str(steps)]) / curve["0"]


def render(data: dict) -> str:
    runs = data["runs"]
    headers = ["method", "rms h", "rms x", "into B (rms)", "s", "s x into B"]
    headers += [f"loss drop, {s} steps, lr {lr:g}" for lr in data["rates"] for s in data["steps"]]
    headers += [f"/ LoRA's, {s} steps, lr {lr:g}" for lr in data["rates"] for s in data["steps"]]
    lora = runs["LoRA r=4"]["rates"]
    out = []
    for label, run in runs.items():
        sc = run["scales"]
        row = [label, f"{sc['h']:.2f}", f"{sc['x']:.3f}" if "x" in sc else "-", f"{sc['into_B']:.4f}", f"{sc['s']:g}",
               f"{sc['s'] * sc['into_B']:.4f}"]
        for lr in data["rates"]:
            for s in data["steps"]:
                d = [drop(c, s) for c in run["rates"][str(lr)]]
                row.append(f"{100 * mean(d):.2f}% ± {100 * ci95(d):.2f}")
        for lr in data["rates"]:
            for s in data["steps"]:
                ratio = [drop(c, s) / drop(ref, s) for c, ref in zip(run["rates"][str(lr)], lora[str(lr)])]
                row.append(f"{mean(ratio):.2f} ± {ci95(ratio):.2f}")
        out.append(row + [{True: "yes", False: "no", None: "-"}[learns(data, label)] if label != "LoRA r=4" else "-"])
    return table(headers + [f"learns (>= {LEARNS_SHARE:g} of LoRA's at lr {LEARNS_RATE:g})"], out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.slow_start", description=__doc__.split("\n")[0])
    parser.add_argument("--render", action="store_true", help="print the table from the stored JSON")
    args = parser.parse_args(argv)
    if not args.render:
        write_json(PATH, measure())
    data = read_json(PATH)
    machine = data["machine"]
    about = __doc__.split("\n\n    python")[0]
    doc = (f"# Slow start on small activations (issue #21, item 3)\n\n{about}"
           f"\n\nMeasured {machine['date']} on {machine['cpu']}, torch {machine['torch']}, peft {machine['peft']}; "
           f"{data['seeds']} seeds, mean ± 95% t-interval; the ratios are paired by seed. Written by "
           f"`python -m benchmarks.quality.slow_start`.\n\n{render(data)}\n")
    with open(DOC, "w", encoding="utf-8") as handle:
        handle.write(doc)
    print(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
