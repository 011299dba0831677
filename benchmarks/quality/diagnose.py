"""Part of section 4: why ID-LoRA trailed LoRA: the skeleton's conditioning, the router's scale, and the size of
each update.

Measured on SmolLM2-135M-Instruct (fp32) at the quality protocol's targets, rank pairing and learning rate,
on real inputs (a batch of the built-in training rows), per module type (median over the 30 layers):

1. Skeleton conditioning: singular values of the `k r` selected rows `W[idx]` and of the gathered
   activations `x` (`[tokens, k r]`) for PMRC, random and sequential rows: condition number and effective rank
   (exp of the entropy of the normalised singular values; Roy and Vetterli 2007). Also the rows a column-pivoted
   QR picks inside each PMRC cluster, the interpolative decomposition's own choice (reference only).
2. The router at initialisation: `T`'s gradient (exactly zero while `B = 0`), the rms of `x` and of
   `v = sum_i alpha_i x_i`, and the spread of `alpha_i` over tokens, for `router_norm` "none" (paper) and "rms".
3. Update size: `rms(delta y) / rms(y)` of every adapted module after one AdamW step at the same learning rate,
   for LoRA and for ID-LoRA with each router norm; and at the end of training, for each method's saved adapter
   at its chosen rate.
Its tables: `report.diagnosis`.
"""
from __future__ import annotations

import copy

import torch

from benchmarks.stats import median

VARIANTS = {"ID-LoRA, router_norm=none (paper)": {"router_norm": "none"},
            "ID-LoRA, router_norm=rms": {"router_norm": "rms"}}


def _batch(tokenizer, rows: list[dict]) -> dict:
    texts = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch, labels=labels)


def _kind(name: str) -> str:
    return name.split(".")[-1]


def _spectrum(matrix: torch.Tensor) -> tuple[float, float]:
    """(condition number, effective rank) of a matrix, in float64."""
    s = torch.linalg.svdvals(matrix.double())
    p = s / s.sum()
    return float(s[0] / s[-1].clamp(min=1e-300)), float(torch.exp(-(p * p.clamp(min=1e-300).log()).sum()))


def _qr_rows(weight: torch.Tensor, indices: torch.Tensor, labels_of) -> torch.Tensor:
    """Inside each cluster of PMRC, the r rows a column-pivoted QR of the cluster's rows picks first."""
    import scipy.linalg

    k, r = indices.shape
    picked = []
    for c in range(k):
        members = labels_of(c)
        _, _, pivots = scipy.linalg.qr(weight[members].double().T.numpy(), mode="economic", pivoting=True)
        picked.append(members[torch.as_tensor(pivots[:r])])
    return torch.stack(picked)


def conditioning(base, batch: dict, targets: list[str], r: int, k: int) -> list[dict]:
    from idlora_trl.decomposition import constrained_kmeans, select_rows

    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, args[0].detach()))
             for n, m in base.named_modules() if _kind(n) in targets and isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for hook in hooks:
        hook.remove()
    keep = batch["attention_mask"].reshape(-1).bool()
    found: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    for name, h in inputs.items():
        weight = dict(base.named_modules())[name].weight.detach().float()
        h = h.reshape(-1, h.shape[-1])[keep]
        tables = {s: select_rows(weight, num_clusters=k, r=r, selection=s) for s in ("pmrc", "random", "sequential")}
        labels, _, _ = constrained_kmeans(weight, k, r, seed=0)
        tables["pmrc + pivoted QR in each cluster (reference)"] = _qr_rows(
            weight, tables["pmrc"], lambda c: (labels == c).nonzero().squeeze(1))
        for selection, idx in tables.items():
            rows = weight[idx.reshape(-1)]
            found.setdefault((_kind(name), selection), []).append((*_spectrum(rows), *_spectrum(h @ rows.T)))
    out = []
    for (kind, selection), values in found.items():
        med = [median(v[i] for v in values) for i in range(4)]
        out.append(dict(module=kind, selection=selection, rows_cond=med[0], rows_erank=med[1], x_cond=med[2],
                        x_erank=med[3], layers=len(values)))
    return out


def _adapted(base, config):
    from peft import get_peft_model

    return get_peft_model(copy.deepcopy(base), config)


def router(base, batch: dict, targets: list[str], r: int, k: int) -> list[dict]:
    from idlora_trl import IDLoRAConfig
    from idlora_trl.layer import IDLoRALayer

    out = []
    for label, settings in VARIANTS.items():
        torch.manual_seed(0)
        model = _adapted(base, IDLoRAConfig(r=r, num_clusters=k, target_modules=targets, **settings))
        stats: dict[str, dict[str, list]] = {}

        def hook(module, args, output, stats=stats):
            name = module.module_name
            base_out = module.base_layer(args[0]).detach()
            gathered = (base_out.index_select(-1, module.idlora_indices["default"].reshape(-1))
                        - (0 if module.base_layer.bias is None else module.base_layer.bias[
                            module.idlora_indices["default"].reshape(-1)])).unflatten(-1, (k, r))
            variant = module.idlora_variant["default"]  # the layer's router (token router here)
            v, alpha, _ = variant.mix(gathered.reshape(-1, k, r), module.idlora_T["default"].weight.view(-1))
            s = stats.setdefault(_kind(name), {"x": [], "v": [], "alpha": []})
            s["x"].append(float(gathered.square().mean().sqrt()))
            s["v"].append(float((v * module.scaling["default"]).square().mean().sqrt()))
            s["alpha"].append(alpha.detach().reshape(-1))

        hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, IDLoRALayer)]
        model(**batch).loss.backward()
        for handle in hooks:
            handle.remove()
        t_grad = max(float(m.idlora_T["default"].weight.grad.abs().max()) for m in model.modules()
                     if isinstance(m, IDLoRALayer))
        b_grad = max(float(m.idlora_B["default"].weight.grad.abs().max()) for m in model.modules()
                     if isinstance(m, IDLoRALayer))
        for kind, s in stats.items():
            alpha = torch.cat(s["alpha"]).abs()
            q = torch.quantile(alpha[:100000], torch.tensor([0.5, 0.99])).tolist()
            out.append(dict(variant=label, module=kind, x_rms=median(s["x"]),
                            v_rms=median(s["v"]), alpha_median=q[0], alpha_p99=q[1],
                            max_T_grad=t_grad, max_B_grad=b_grad))
    return out


def _ratios(model, batch: dict, targets: list[str]) -> dict[str, list[float]]:
    """`rms(delta y) / rms(y)` of every adapted module on `batch`, by module type (delta y: the adapter's part)."""
    ratios: dict[str, list[float]] = {}
    module_names = {m: n for n, m in model.named_modules() if _kind(n) in targets and hasattr(m, "base_layer")}

    def hook(module, args, output):
        base_out = module.base_layer(args[0])
        ratios.setdefault(_kind(module_names[module]), []).append(
            float((output - base_out).square().mean().sqrt() / base_out.square().mean().sqrt()))

    hooks = [m.register_forward_hook(hook) for m in module_names]
    with torch.no_grad():
        model(**batch)
    for handle in hooks:
        handle.remove()
    return ratios


def update_sizes(base, batch: dict, targets: list[str], p: int, lr: float) -> list[dict]:
    """`rms(delta y) / rms(y)` per module type after one AdamW step (batch = the protocol's first batch)."""
    from peft import LoraConfig

    from idlora_trl import IDLoRAConfig

    configs = {f"LoRA r={p}": LoraConfig(r=p, lora_alpha=2 * p, target_modules=targets)}
    configs.update({label: IDLoRAConfig(r=4 * p, target_modules=targets, **s) for label, s in VARIANTS.items()})
    out = []
    for label, config in configs.items():
        torch.manual_seed(0)
        model = _adapted(base, config)
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=lr, weight_decay=0.0)
        model(**batch).loss.backward()
        optimizer.step()
        for kind, values in _ratios(model, batch, targets).items():
            out.append(dict(method=label, module=kind, median=median(values), max=max(values)))
    return out


def trained_updates(base, batch: dict, targets: list[str], adapters: dict[str, str]) -> list[dict]:
    """The same ratio at the end of training, for saved adapters (`{label: adapter folder}`): how large each
    method's update has grown by the last step, per module type."""
    from peft import PeftModel

    import idlora_trl  # noqa: F401  (registers IDLORA with PEFT, whatever ran before)

    out = []
    for label, folder in adapters.items():
        model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        for kind, values in _ratios(model, batch, targets).items():
            out.append(dict(method=label, module=kind, median=median(values), max=max(values)))
    return out


def run(base, tokenizer, rows: list[dict], targets: list[str], p: int, lr: float, k: int = 4,
        adapters: dict[str, str] | None = None) -> dict:
    batch = _batch(tokenizer, rows)
    return {"conditioning": conditioning(base, batch, targets, 4 * p, k),
            "router": router(base, batch, targets, 4 * p, k),
            "update": update_sizes(base, batch, targets, p, lr), "lr": lr, "rows": len(rows), "p": p, "k": k,
            "trained": trained_updates(base, batch, targets, adapters or {})}
