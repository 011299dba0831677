"""Section 7's measurement: QLoRA (PEFT LoRA) and ID-LoRA, each on a fresh 4-bit load of one checkpoint, stepped
in turn (section 3's `compare`)."""
from __future__ import annotations

import os
import tempfile

import torch

from benchmarks.common import log, tiny_llama
from benchmarks.training.measure import compare, lm_loss, peft_config, sizes

TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]  # the main job's
MISSING = "bitsandbytes is not installed (pip install --no-deps bitsandbytes)"


def add_arguments(parser) -> None:
    group = parser.add_argument_group("qlora")
    group.add_argument("--qlora-quant", default="nf4", choices=["nf4", "fp4"], help="bitsandbytes 4-bit type")


def _loader(path: str, quant: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_compute_dtype=torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def load():
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32,
                                                     device_map={"": device})
        return model.requires_grad_(False)
    return load


def base_bytes(model) -> int:
    """Bytes of the base model's tensors (4-bit packed weights, their quantization state, the float rest)."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            total += sum(t.numel() * t.element_size() for t in vars(state).values() if isinstance(t, torch.Tensor))
    return total


def run(args) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return {"skipped": MISSING}
    device, p, batch, seq, saved = sizes(args)
    with tempfile.TemporaryDirectory() as folder:
        if args.smoke:
            tiny_llama(vocab=128, hidden=64, layers=2).save_pretrained(folder)
            path, label = folder, "tiny Llama (smoke)"
        else:
            from idlora_trl_app.smollm2 import MODEL_NAME, smollm2_path

            path, label = smollm2_path(), MODEL_NAME
        load = _loader(path, args.qlora_quant)
        probe = load()
        vocab, weight = probe.config.vocab_size, base_bytes(probe)
        kind = type(probe.model.layers[0].mlp.gate_proj).__name__
        del probe
        gen = torch.Generator().manual_seed(0)
        inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen).to(device)}
        log(f"qlora: {label}, {args.qlora_quant}, targets q,k,v,gate,up")
        bases = {"QLoRA": (load, peft_config("LoRA", p, TARGETS, args.train_selection, args.seed)),
                 "ID-LoRA": (load, peft_config("ID-LoRA", p, TARGETS, args.train_selection, args.seed))}
        result = compare(bases, inputs, lm_loss, args, device, profile=False)
    data = {"model": label, "device": device, "quant": args.qlora_quant, "layer_type": kind, "p": p, "batch": batch,
            "seq": seq, "repeats": args.train_repeats, "forward_repeats": args.forward_repeats,
            "warmup": args.train_warmup, "base_bytes": weight, "result": result,
            "bitsandbytes": __import__("bitsandbytes").__version__, "path_is_local": os.path.isdir(path)}
    args.train_repeats, args.forward_repeats, args.train_warmup = saved
    return data
