"""Section 6's measurement: every model in turn (interleaved), eager then compiled: prefill, decode with the KV
cache at batch 1 and 8, and a 4-token forward."""
from __future__ import annotations

import copy
import os
import time

import torch

from benchmarks.common import STORED, log, read_json, smollm2, sync, tiny_llama

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


def build_models(base, p: int, seed: int,
                 names=("base", "LoRA", "LoRA merged", "ID-LoRA", "ID-LoRA static merged")):
    from peft import LoraConfig, get_peft_model

    from idlora_trl import IDLoRAConfig
    from idlora_trl_app.defaults import DEFAULT_TARGETS

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


def time_models(models: dict, args, vocab: int, prefill: int, decode: int, device: str = "cpu") -> dict:
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
        base, label, p, prefill, decode, rounds = tiny_llama(), "tiny Llama (smoke)", 2, 32, 4, 1
    else:
        (base, _, label), p = smollm2(), 8
        prefill, decode, rounds = args.prefill, args.decode, args.inference_rounds
    saved, args.inference_rounds = args.inference_rounds, rounds
    base.requires_grad_(False)
    models = build_models(base, p, args.seed)
    log(f"inference: {label}, eager")
    data = {"model": label, "p": p, "prefill": prefill, "decode": decode, "rounds": rounds,
            "eager": time_models(models, args, base.config.vocab_size, prefill, decode)}
    if args.inference_eager_only:
        old = read_json(os.path.join(STORED, "inference.json"))
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
        data["compiled"] = time_models(compiled, args, base.config.vocab_size, prefill, decode)
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
