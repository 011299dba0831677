"""Section 6: inference speed: prefill, decoding with the KV cache, and the forward at a few tokens.

Models, all from the same base weights (SmolLM2-135M-Instruct, fp32, the main job's targets q,k,v,gate,up): the
base; PEFT LoRA r=p unmerged and merged; ID-LoRA r=4p with the token router (the default, not mergeable); ID-LoRA
r=4p with the static router, merged. Adapters start away from zero (random B), as after training. Each round runs
every model in turn (interleaved), eager, then compiled (`torch.compile`, inductor) for the base, unmerged LoRA and
ID-LoRA; a merged model is a plain base model, so its compiled graph is the base's:
- prefill: one forward of `--prefill` tokens at batch 1, filling the KV cache (tokens/s);
- decode: after an untimed prefill of a 32-token prompt, `--decode` greedy steps of one token per sequence with the
  cache, at batch 1 and 8 (tokens/s: batch x steps / time);
- small forward: one forward of 4 tokens without the cache (the per-call cost, seconds).
Ratios are medians of the per-round ratios (ID-LoRA / LoRA rounds ran side by side).
"""
from __future__ import annotations

import copy
import time

import torch

from common import fmt_s, log, median, sync, table, target

DECODE_TARGET, SMALL_TARGET = 0.98, 1.05  # issue #22: decode >= 0.98x unmerged LoRA's tokens/s, 1-4 tokens <= 1.05x
COMPILED = ("base", "LoRA", "ID-LoRA")


def add_arguments(parser) -> None:
    group = parser.add_argument_group("inference")
    group.add_argument("--prefill", type=int, default=512, help="prefill tokens (batch 1)")
    group.add_argument("--decode", type=int, default=32, help="decoding steps with the KV cache")
    group.add_argument("--inference-rounds", type=int, default=5, help="interleaved rounds per measurement")
    group.add_argument("--no-compile", action="store_true", help="eager models only")
    group.add_argument("--inference-eager-only", action="store_true",
                       help="measure the eager models only; the compiled part is kept from the stored inference.json "
                            "(with the date it was measured)")


def _models(base, p: int, seed: int, names=("base", "LoRA", "LoRA merged", "ID-LoRA", "ID-LoRA static merged")):
    from peft import LoraConfig, get_peft_model

    from idlora_trl import IDLoRAConfig
    from idlora_trl.settings import DEFAULT_TARGETS

    targets = DEFAULT_TARGETS.split(",")

    def adapted(config, merge: bool):
        model = get_peft_model(copy.deepcopy(base), config)
        torch.manual_seed(seed)
        for param in model.parameters():
            if param.requires_grad:
                param.data.normal_(0, 0.02)
        return (model.merge_and_unload() if merge else model).eval()

    lora = LoraConfig(r=p, lora_alpha=2 * p, target_modules=targets)
    idlora = dict(r=4 * p, num_clusters=4, rank_boost=2, target_modules=targets, seed=seed)
    build = {"base": lambda: base.eval(), "LoRA": lambda: adapted(lora, False),
             "LoRA merged": lambda: adapted(lora, True), "ID-LoRA": lambda: adapted(IDLoRAConfig(**idlora), False),
             "ID-LoRA static merged": lambda: adapted(IDLoRAConfig(router="static", **idlora), True)}
    return {name: build[name]() for name in names}


@torch.no_grad()
def _decode_seconds(model, prompt: torch.Tensor, steps: int) -> float:
    out = model(input_ids=prompt, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync()
    return time.perf_counter() - start


@torch.no_grad()
def _forward_seconds(model, ids: torch.Tensor, use_cache: bool) -> float:
    sync()
    start = time.perf_counter()
    model(input_ids=ids, use_cache=use_cache)
    sync()
    return time.perf_counter() - start


def _measure(models: dict, args, vocab: int, prefill: int, decode: int, device: str = "cpu") -> dict:
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, vocab, (b, 32), generator=gen).to(device) for b in (1, 8)}
    long_ids = torch.randint(0, vocab, (1, prefill), generator=gen).to(device)
    small_ids = torch.randint(0, vocab, (1, 4), generator=gen).to(device)
    tasks = {"prefill_s": lambda m: _forward_seconds(m, long_ids, True),
             "decode1_s": lambda m: _decode_seconds(m, prompts[1], decode),
             "decode8_s": lambda m: _decode_seconds(m, prompts[8], decode),
             "small_s": lambda m: _forward_seconds(m, small_ids, False)}
    times = {key: {name: [] for name in models} for key in tasks}
    for key, task in tasks.items():
        for model in models.values():  # warm-up (and, compiled, the compilation)
            task(model)
            task(model)
        for _ in range(args.inference_rounds):
            for name, model in models.items():
                times[key][name].append(task(model))
    return times


def run(args) -> dict:
    torch.manual_seed(0)
    if args.smoke:
        from common import tiny_llama

        base, label, p, prefill, decode, rounds = tiny_llama(), "tiny Llama (smoke)", 2, 32, 4, 1
    else:
        from idlora_trl.smollm2 import load_smollm2

        base, label, p = load_smollm2()[0], "SmolLM2-135M-Instruct", 8
        prefill, decode, rounds = args.prefill, args.decode, args.inference_rounds
    saved, args.inference_rounds = args.inference_rounds, rounds
    base.requires_grad_(False)
    models = _models(base, p, args.seed)
    log(f"inference: {label}, eager")
    data = {"model": label, "p": p, "prefill": prefill, "decode": decode, "rounds": rounds,
            "eager": _measure(models, args, base.config.vocab_size, prefill, decode)}
    if args.inference_eager_only:
        import json
        import os

        stored = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks",
                              "inference.json")
        with open(stored, encoding="utf-8") as handle:
            old = json.load(handle)
        data.update({key: old[key] for key in ("compiled", "graph_breaks", "backend") if key in old},
                    compiled_measured=old.get("compiled_measured") or old["machine"]["date"])
    elif not args.no_compile:
        import torch._dynamo as dynamo

        backend = "aot_eager" if args.smoke else "inductor"  # the smoke run checks the path, not the kernels
        log(f"inference: {label}, compiled ({backend})")
        dynamo.reset()
        # The three models share code objects (PeftModel.forward, LlamaForCausalLM.forward), and each shape and
        # cache state is a variant: at the default limit of 8 per code object the later ones would run eagerly.
        dynamo.config.recompile_limit = 64
        dynamo.config.accumulated_recompile_limit = 1024
        compiled = {name: torch.compile(models[name], backend=backend) for name in COMPILED}
        data["compiled"] = _measure(compiled, args, base.config.vocab_size, prefill, decode)
        counts = {}
        for name in COMPILED:
            dynamo.reset()
            ids = torch.randint(0, base.config.vocab_size, (1, 4))
            counts[name] = dynamo.explain(lambda x, m=models[name]: m(input_ids=x, use_cache=False))(ids) \
                .graph_break_count
        data["graph_breaks"], data["backend"] = counts, backend
        dynamo.reset()
    args.inference_rounds = saved
    return data


# -------------------------------------------------------------------------------------------- render
def _paired(times: dict, key: str, a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b): rounds ran side by side."""
    return median(x / y for x, y in zip(times[key][a], times[key][b]))


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
            ratio = 1 / _paired(times, key, "ID-LoRA", "LoRA")  # tokens/s ratio
            targets.append(target(f"Decode tokens/s of ID-LoRA / unmerged LoRA, {label}, {mode}",
                                  f">= {DECODE_TARGET:.2f}x", f"{ratio:.3f}x", ratio >= DECODE_TARGET))
        ratio = _paired(times, "small_s", "ID-LoRA", "LoRA")
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
