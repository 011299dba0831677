"""Section 3's measurement: LoRA, DoRA and ID-LoRA models of the same base weights, stepped in turn (interleaved):
step and forward times, saved activations and training state, operator profiles."""
from __future__ import annotations

import copy
import gc

import torch
from torch import nn

from benchmarks.common import interleaved, log, smollm2, tiny_llama

METHODS = ("LoRA", "DoRA", "ID-LoRA")
TARGETS = {"q,k,v,gate,up": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], "all-linear": "all-linear"}


def add_arguments(parser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--p", type=int, default=8, help="LoRA/DoRA rank p; ID-LoRA gets rank 4p")
    group.add_argument("--batch", type=int, default=4, help="sequences per batch")
    group.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    group.add_argument("--train-repeats", type=int, default=10, help="timed steps per method (median)")
    group.add_argument("--forward-repeats", type=int, default=20, help="timed no-grad forwards per method (median)")
    group.add_argument("--train-warmup", type=int, default=2, help="untimed rounds before timing")
    group.add_argument("--train-selection", default="pmrc", help="ID-LoRA row selection for the timed models")


def peft_config(method: str, p: int, targets, selection: str, seed: int):
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


def lm_loss(model, inputs, forward_only=False):
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


def compare(bases: dict, inputs: dict, loss_fn, args, device: str, profile: bool) -> dict:
    """Interleaved step and forward timings, memory and (optionally) an operator profile of each method.
    `bases`: method -> (base model, or a function that builds one, PEFT config)."""
    from peft import get_peft_model

    benches, params = {}, {}
    for method, (base, config) in bases.items():  # a model is copied; a function makes a fresh one (4-bit bases)
        peft_model = get_peft_model(copy.deepcopy(base) if isinstance(base, nn.Module) else base(), config)
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


def sizes(args) -> tuple[str, int, int, int, tuple]:
    """`(device, p, batch, seq, saved)` of a timed comparison; with --smoke toy sizes and 2 timed rounds after 1
    (set on `args`; `saved` holds the counts to put back)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = 2 if args.smoke else args.p
    batch, seq = (2, 16) if args.smoke else (args.batch, args.seq)
    saved = args.train_repeats, args.forward_repeats, args.train_warmup
    if args.smoke:
        args.train_repeats, args.forward_repeats, args.train_warmup = 2, 2, 1
    return device, p, batch, seq, saved


def run(args) -> dict:
    device, p, batch, seq, saved = sizes(args)
    if args.smoke:
        base, label = tiny_llama(vocab=128, hidden=64, layers=2), "tiny Llama (smoke)"
    else:
        base, _, label = smollm2()
    base.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, base.config.vocab_size, (batch, seq), generator=gen).to(device)}
    results = {}
    for tname, targets in TARGETS.items():
        log(f"training: {label}, targets {tname}")
        bases = {m: (base, peft_config(m, p, targets, args.train_selection, args.seed)) for m in METHODS}
        results[tname] = compare(bases, inputs, lm_loss, args, device, profile=tname == "q,k,v,gate,up")
        gc.collect()

    # one gate_proj-shaped layer alone (SmolLM2's block-0 weight, so PMRC clusters real rows)
    gate = base.model.layers[0].mlp.gate_proj
    linear = nn.Linear(gate.in_features, gate.out_features, bias=False)
    linear.weight.data.copy_(gate.weight.data)
    linear.requires_grad_(False)
    layer_inputs = {"x": torch.randn(batch * seq, gate.in_features, generator=gen).to(device).requires_grad_(True),
                    "grad": torch.randn(batch * seq, gate.out_features, generator=gen).to(device)}
    log("training: single gate_proj layer")
    layer_bases = {m: (_OneLayer(linear), peft_config(m, p, ["proj"], args.train_selection, args.seed))
                   for m in METHODS}
    layer = compare(layer_bases, layer_inputs, _layer_loss, args, device, profile=True)
    layer["shape"] = [gate.out_features, gate.in_features]
    data = {"model": label, "device": device, "p": p, "batch": batch, "seq": seq, "selection": args.train_selection,
            "repeats": args.train_repeats, "forward_repeats": args.forward_repeats, "warmup": args.train_warmup,
            "models": results, "layer": layer}
    args.train_repeats, args.forward_repeats, args.train_warmup = saved
    return data
