"""Section 3: training cost of ID-LoRA (rank 4p) against PEFT LoRA and DoRA (rank p), same model, same batch.

Three `PeftModel`s are built from copies of the same base weights (SmolLM2-135M-Instruct, fp32) and run in
turn (LoRA, DoRA, ID-LoRA, LoRA, ...) after a warm-up:
- train step: forward + backward + AdamW step on one fixed batch of random tokens (labels = inputs);
- forward: the same batch under `torch.no_grad()`, in eval mode;
- memory: on the CPU, the bytes of the tensors autograd saves for backward during one forward
  (`torch.autograd.graph.saved_tensors_hooks`, deduplicated by storage, the model's own parameters and
  buffers left out) plus the adapter's training state (trainable parameters + gradients + two AdamW
  moments); on CUDA also `torch.cuda.max_memory_allocated` over one step.
A single adapted layer (SmolLM2's gate_proj shape) is timed the same way, to isolate the adapter from the
rest of the network, and `torch.profiler` shows which operators make the difference.
"""
from __future__ import annotations

import copy
import gc
import math

import torch
from torch import nn

from common import fmt_mib, interleaved, log, median, table, target, tiny_llama

METHODS = ("LoRA", "DoRA", "ID-LoRA")
TARGETS = {"q,k,v,gate,up": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], "all-linear": "all-linear"}
STEP_TARGET, FORWARD_TARGET, MEMORY_TARGET = 1.00, 1.00, 1.00  # issue #12: no slower than LoRA anywhere


def add_arguments(parser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--p", type=int, default=8, help="LoRA/DoRA rank p; ID-LoRA gets rank 4p")
    group.add_argument("--batch", type=int, default=4, help="sequences per batch")
    group.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    group.add_argument("--train-repeats", type=int, default=10, help="timed steps per method (median)")
    group.add_argument("--forward-repeats", type=int, default=20, help="timed no-grad forwards per method (median)")
    group.add_argument("--train-warmup", type=int, default=2, help="untimed rounds before timing")
    group.add_argument("--train-selection", default="pmrc", help="ID-LoRA row selection for the timed models")


def _config(method: str, p: int, targets, selection: str, seed: int):
    from peft import LoraConfig

    from idlora_trl import IDLoRAConfig

    if method == "ID-LoRA":
        return IDLoRAConfig(r=4 * p, num_clusters=4, rank_boost=2, target_modules=targets, selection=selection,
                            seed=seed)
    return LoraConfig(r=p, lora_alpha=2 * p, lora_dropout=0.0, target_modules=targets, use_dora=method == "DoRA")


def _param_ptrs(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}


def saved_bytes(forward, exclude: set[int]) -> tuple[int, object]:
    """Bytes of the tensors saved for backward while `forward()` runs (each storage once, `exclude` left out)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in exclude and ptr not in seen:
                seen[ptr] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(seen.values()), out


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _state_bytes(model: nn.Module) -> int:
    """Trainable parameters + their gradients + AdamW's two moments."""
    return 4 * sum(p.numel() * p.element_size() for p in _trainable(model))


class _Bench:
    """One model and its optimizer: `step()`, `forward()`, `memory()`."""

    def __init__(self, model: nn.Module, inputs: dict, loss_fn, device: str) -> None:
        self.model, self.inputs, self.loss_fn, self.device = model.to(device), inputs, loss_fn, device
        self.opt = torch.optim.AdamW(_trainable(model), lr=1e-4)
        self.exclude = _param_ptrs(model)

    def step(self) -> None:
        self.model.train()
        self.loss_fn(self.model, self.inputs).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def forward(self) -> None:
        self.model.eval()
        with torch.no_grad():
            self.loss_fn(self.model, self.inputs, forward_only=True)

    def memory(self) -> dict:
        self.model.train()
        saved, loss = saved_bytes(lambda: self.loss_fn(self.model, self.inputs), self.exclude)
        loss.backward()
        self.opt.zero_grad(set_to_none=True)
        out = {"saved_bytes": saved, "state_bytes": _state_bytes(self.model)}
        if self.device == "cuda":
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            self.step()
            torch.cuda.synchronize()
            out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - before
        return out


def _lm_loss(model, inputs, forward_only=False):
    if forward_only:
        return model(input_ids=inputs["input_ids"])
    return model(input_ids=inputs["input_ids"], labels=inputs["input_ids"]).loss


def _layer_loss(model, inputs, forward_only=False):
    out = model(inputs["x"])
    if forward_only:
        return out
    return (out * inputs["grad"]).sum()  # backward sends the fixed `grad` into the layer's output


class _OneLayer(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _compare(bases: dict, inputs: dict, loss_fn, args, device: str, profile: bool) -> dict:
    """Interleaved step and forward timings, memory and (optionally) an operator profile of each method."""
    from peft import get_peft_model

    benches, params = {}, {}
    for method, (base, config) in bases.items():
        peft_model = get_peft_model(copy.deepcopy(base), config)
        params[method] = sum(p.numel() for p in _trainable(peft_model))
        benches[method] = _Bench(peft_model, inputs, loss_fn, device)
    steps = interleaved({m: b.step for m, b in benches.items()}, args.train_repeats, args.train_warmup)
    forwards = interleaved({m: b.forward for m, b in benches.items()}, args.forward_repeats, args.train_warmup)
    memory = {m: b.memory() for m, b in benches.items()}
    result = {"params": params, "step_s": steps, "forward_s": forwards, "memory": memory}
    if profile:
        result["profile"] = {m: _profile(benches[m].step) for m in ("LoRA", "ID-LoRA")}
        result["forward_profile"] = {m: _profile(benches[m].forward) for m in ("LoRA", "ID-LoRA")}
    return result


def _profile(fn, runs: int = 2) -> dict:
    """Self CPU time (ms per run) and calls per run of each operator over `runs` calls of `fn`."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn()
    return {e.key: [e.self_cpu_time_total / 1e3 / runs, e.count / runs] for e in prof.key_averages()}


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = 2 if args.smoke else args.p
    batch, seq = (2, 16) if args.smoke else (args.batch, args.seq)
    saved = args.train_repeats, args.forward_repeats, args.train_warmup
    if args.smoke:
        args.train_repeats, args.forward_repeats, args.train_warmup = 2, 2, 1
    if args.smoke:
        base, label = tiny_llama(vocab=128, hidden=64, layers=2), "tiny Llama (smoke)"
    else:
        from idlora_trl.smollm2 import load_smollm2

        base, label = load_smollm2()[0], "SmolLM2-135M-Instruct"
    base.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, base.config.vocab_size, (batch, seq), generator=gen).to(device)}
    results = {}
    for tname, targets in TARGETS.items():
        log(f"training: {label}, targets {tname}")
        bases = {m: (base, _config(m, p, targets, args.train_selection, args.seed)) for m in METHODS}
        results[tname] = _compare(bases, inputs, _lm_loss, args, device, profile=tname == "q,k,v,gate,up")
        gc.collect()

    # one gate_proj-shaped layer alone (SmolLM2's block-0 weight, so PMRC clusters real rows)
    gate = base.model.layers[0].mlp.gate_proj
    linear = nn.Linear(gate.in_features, gate.out_features, bias=False)
    linear.weight.data.copy_(gate.weight.data)
    linear.requires_grad_(False)
    layer_inputs = {"x": torch.randn(batch * seq, gate.in_features, generator=gen).to(device).requires_grad_(True),
                    "grad": torch.randn(batch * seq, gate.out_features, generator=gen).to(device)}
    log("training: single gate_proj layer")
    layer_bases = {m: (_OneLayer(linear), _config(m, p, ["proj"], args.train_selection, args.seed)) for m in METHODS}
    layer = _compare(layer_bases, layer_inputs, _layer_loss, args, device, profile=True)
    layer["shape"] = [gate.out_features, gate.in_features]
    data = {"model": label, "device": device, "p": p, "batch": batch, "seq": seq, "selection": args.train_selection,
            "repeats": args.train_repeats, "forward_repeats": args.forward_repeats, "warmup": args.train_warmup,
            "models": results, "layer": layer}
    args.train_repeats, args.forward_repeats, args.train_warmup = saved
    return data


# -------------------------------------------------------------------------------------------- render
def _section_table(res: dict, what: str) -> list[list]:
    rows = []
    for m in METHODS:
        step, fwd = median(res["step_s"][m]), median(res["forward_s"][m])
        mem = res["memory"][m]
        total = mem["saved_bytes"] + mem["state_bytes"]
        lora = res["memory"]["LoRA"]
        lora_total = lora["saved_bytes"] + lora["state_bytes"]
        row = [m, f"{res['params'][m]:,}", f"{step * 1e3:.1f}", f"{step / median(res['step_s']['LoRA']):.3f}x",
               f"{fwd * 1e3:.1f}", f"{fwd / median(res['forward_s']['LoRA']):.3f}x",
               fmt_mib(mem["saved_bytes"]), fmt_mib(mem["state_bytes"]), fmt_mib(total), f"{total / lora_total:.4f}x"]
        if "cuda_peak_bytes" in mem:
            row.append(fmt_mib(mem["cuda_peak_bytes"]))
        rows.append(row)
    return rows


HEADERS = ["method", "trainable", "step, ms", "step / LoRA", "forward, ms", "forward / LoRA",
           "saved activations, MiB", "params+grads+AdamW, MiB", "memory, MiB", "memory / LoRA"]


def _ratios(res: dict) -> dict:
    mem = {m: res["memory"][m]["saved_bytes"] + res["memory"][m]["state_bytes"] for m in METHODS}
    return {"step": median(res["step_s"]["ID-LoRA"]) / median(res["step_s"]["LoRA"]),
            "forward": median(res["forward_s"]["ID-LoRA"]) / median(res["forward_s"]["LoRA"]),
            "memory": mem["ID-LoRA"] / mem["LoRA"]}


def paired_interval(res: dict, key: str, level: float = 0.95) -> tuple[float, float, float]:
    """Median and distribution-free `level` interval of the per-round ratio ID-LoRA / LoRA of `res[key]` (the
    rounds are interleaved, so round i of both methods ran side by side): order statistics of the sorted ratios
    whose ranks a Binomial(n, 1/2) puts outside `(1 - level) / 2` on each side."""
    ratios = sorted(a / b for a, b in zip(res[key]["ID-LoRA"], res[key]["LoRA"]))
    n, tail, j = len(ratios), 0.0, 0
    while j < n // 2 and tail + math.comb(n, j) / 2 ** n <= (1 - level) / 2:
        tail += math.comb(n, j) / 2 ** n
        j += 1
    low, high = (ratios[j - 1], ratios[n - j]) if j else (ratios[0], ratios[-1])
    return median(ratios), low, high


def _measured(res: dict, key: str, ratio: float) -> str:
    if key == "memory":
        return f"{ratio:.3f}x"
    mid, low, high = paired_interval(res, f"{key}_s")
    return f"{ratio:.3f}x (paired rounds: {mid:.3f}x, 95% CI {low:.3f}-{high:.3f})"


def _noise(res: dict, key: str, goal: float) -> str:
    """For a missed time target: whether the paired interval still holds the goal."""
    if key == "memory":
        return ""
    _, low, _ = paired_interval(res, f"{key}_s")
    return (f". The paired 95% interval reaches down to {low:.3f}x: within this machine's run-to-run spread, "
            "not a measured excess." if low <= goal else "")


def _profile_table(prof: dict, top: int = 12) -> str:
    lora, idl = prof["LoRA"], prof["ID-LoRA"]
    keys = sorted(set(lora) | set(idl), key=lambda k: -abs(idl.get(k, [0, 0])[0] - lora.get(k, [0, 0])[0]))
    rows = []
    for key in keys[:top]:
        a, b = lora.get(key, [0.0, 0]), idl.get(key, [0.0, 0])
        rows.append([f"`{key}`", f"{a[0]:.2f} ({a[1]:.0f})", f"{b[0]:.2f} ({b[1]:.0f})", f"{b[0] - a[0]:+.2f}"])
    total_a, total_b = sum(v[0] for v in lora.values()), sum(v[0] for v in idl.values())
    rows.append(["**all operators**", f"{total_a:.2f}", f"{total_b:.2f}", f"{total_b - total_a:+.2f}"])
    return table(["operator", "LoRA: self CPU ms (calls)", "ID-LoRA: self CPU ms (calls)",
                  "ID-LoRA - LoRA, ms"], rows)


def _why(key: str, res: dict, profile, where: str = "the whole model, q,k,v,gate,up") -> str:
    """The measured reason for a missed target: the memory split, or the operators ID-LoRA spends more on."""
    if key == "memory":
        mem = res["memory"]
        return (f"saved activations {fmt_mib(mem['ID-LoRA']['saved_bytes'])} vs {fmt_mib(mem['LoRA']['saved_bytes'])} "
                f"MiB, params+grads+AdamW {fmt_mib(mem['ID-LoRA']['state_bytes'])} vs "
                f"{fmt_mib(mem['LoRA']['state_bytes'])} MiB")
    if not profile:
        return "no profile recorded"
    lora, idl = profile["LoRA"], profile["ID-LoRA"]
    extra = sorted(((idl[k][0] - lora.get(k, [0.0])[0], k) for k in idl), reverse=True)[:3]
    return (f"operators ID-LoRA spends most extra time on (profile of {where}): "
            + ", ".join(f"`{k}` {d:+.1f} ms" for d, k in extra if d > 0))


def render(data: dict, ctx) -> tuple[str, list]:
    p, r = data["p"], 4 * data["p"]
    cuda = data["device"] == "cuda"
    headers = HEADERS + (["CUDA peak over a step, MiB"] if cuda else [])
    out = [f"{data['model']}, fp32, {data['device'].upper()}, one batch of {data['batch']} x {data['seq']} random "
           f"tokens; LoRA and DoRA rank p={p} (PEFT), ID-LoRA rank 4p={r}, k=4, f=2, token router, "
           f"`selection={data['selection']!r}`. The three models are copies of the same base weights and run "
           f"interleaved; medians of {data['repeats']} timed steps and {data.get('forward_repeats', data['repeats'])} "
           f"timed forwards each, after {data.get('warmup', 2)} untimed round(s). \"step\" = forward + "
           "backward + AdamW step; \"forward\" = no-grad forward in eval mode; memory = tensors saved for "
           "backward during one forward (deduplicated by storage, the frozen weights left out) + trainable "
           "parameters, gradients and AdamW moments.", ""]
    targets = []
    profiled = next((res for res in data["models"].values() if res.get("profile")), {})
    for tname, res in data["models"].items():
        out += [f"**Targets {tname}**", "", table(headers, _section_table(res, tname)), ""]
        ratios = _ratios(res)
        for key, goal in (("step", STEP_TARGET), ("forward", FORWARD_TARGET), ("memory", MEMORY_TARGET)):
            ok = ratios[key] <= goal
            why = ""
            if not ok:
                prof = profiled.get("forward_profile" if key == "forward" else "profile")
                why = (f"missed by {100 * (ratios[key] / goal - 1):.1f}%; " + _why(key, res, prof)
                       + _noise(res, key, goal))
            targets.append(target(f"Training {key} of ID-LoRA / LoRA, {tname}", f"<= {goal:.2f}x",
                                  _measured(res, key, ratios[key]), ok, why))
    out += ["Why the memory differs: LoRA saves the input of every adapted layer for the gradient of A "
            "(q, k, v share one input, as do gate and up; o_proj and down_proj have their own), ID-LoRA never "
            "needs a layer's input: its gradients use only the gathered outputs x_i, the router weights and v "
            "(k r + k + r values per token).", ""]
    layer = data["layer"]
    shape = "x".join(map(str, layer["shape"]))
    out += [f"**One adapted layer alone** ({shape}, the gate_proj shape, {data['batch'] * data['seq']} tokens; "
            "\"step\" = forward + backward of the layer with a fixed output gradient, + AdamW step)", "",
            table(headers, _section_table(layer, "layer")), ""]
    lr = _ratios(layer)
    for key, goal in (("step", STEP_TARGET), ("forward", FORWARD_TARGET), ("memory", MEMORY_TARGET)):
        ok = lr[key] <= goal
        why = "" if ok else (f"missed by {100 * (lr[key] / goal - 1):.1f}%; "
                             + _why(key, layer, layer.get("profile"), "the layer, one step") + _noise(layer, key, goal))
        targets.append(target(f"Training {key} of ID-LoRA / LoRA, one layer ({shape})", f"<= {goal:.2f}x",
                              _measured(layer, key, lr[key]), ok, why))
    out += [f"Per layer, ID-LoRA costs {lr['step']:.3f}x LoRA's step time, {lr['forward']:.3f}x its forward and "
            f"{lr['memory']:.3f}x its memory.", ""]
    whole = data["models"].get("q,k,v,gate,up") or {}
    for name, prof in (("the whole model (q,k,v,gate,up), one train step", whole.get("profile")),
                       ("the whole model (q,k,v,gate,up), one no-grad forward", whole.get("forward_profile")),
                       ("the single layer, one forward + backward + AdamW step", layer.get("profile"))):
        if prof:
            out += [f"**Operator profile of {name}** (`torch.profiler`, CPU self time per run; the operators "
                    "whose time differs most between ID-LoRA and LoRA)", "", _profile_table(prof), ""]
    return "\n".join(out), targets
