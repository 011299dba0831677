"""`idlora-trl demo` and `idlora-trl count`.

- `idlora-trl demo`: adapts the embedded SmolLM2-135M-Instruct with ID-LoRA, prints the parameter table
  against LoRA and DoRA, saves the adapter and reloads it (bit-exact, without re-clustering).
- `idlora-trl count`: the parameter table for a model path, a config file, or a known architecture, built on
  the meta device (no weights are read).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ..counting import PRESETS, meta_model
from .common import UsageError, add_idlora_arguments, idlora_config

def cmd_count(args: argparse.Namespace) -> None:
    from peft import get_peft_model

    from ..counting import count_parameters, format_parameter_table

    try:
        model = meta_model(args.model)
    except ValueError as error:
        raise UsageError(str(error)) from error
    try:
        peft_model = get_peft_model(model, idlora_config(args))
    except ValueError as error:
        raise UsageError(str(error)) from error
    print(format_parameter_table(count_parameters(peft_model, lora_r=args.lora_r)))


def cmd_demo(args: argparse.Namespace) -> None:
    from peft import PeftModel, get_peft_model

    from ..counting import count_parameters, format_parameter_table
    from ..smollm2 import load_smollm2, smollm2_path

    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"Loaded SmolLM2-135M-Instruct from {smollm2_path()} in {time.perf_counter() - start:.1f} s")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        base_logits = model(**prompt).logits

    start = time.perf_counter()
    peft_model = get_peft_model(model, idlora_config(args))
    decomposition_s = time.perf_counter() - start
    print(f"\nID-LoRA injected into {len(peft_model.base_model.targeted_module_names)} modules "
          f"(clustering included) in {decomposition_s:.1f} s\n")
    print(format_parameter_table(count_parameters(peft_model, lora_r=args.lora_r)))
    peft_model.print_trainable_parameters()

    with torch.no_grad():
        unchanged = torch.equal(peft_model(**prompt).logits, base_logits)
        answer = peft_model.generate(**prompt, max_new_tokens=12, do_sample=False)
    print(f"\nAt step 0 (B = 0) the model is unchanged: {unchanged}")
    print("Answer:", tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True))

    with torch.no_grad():  # give B a value, so the reload check below compares a real update
        for name, param in peft_model.named_parameters():
            if ".idlora_B." in name:
                param.normal_(std=1e-2, generator=torch.Generator().manual_seed(0))
        adapted = peft_model(**prompt).logits
    peft_model.save_pretrained(args.output_dir)
    start = time.perf_counter()
    reloaded = PeftModel.from_pretrained(load_smollm2()[0], args.output_dir)
    with torch.no_grad():
        same = torch.equal(reloaded(**prompt).logits, adapted)
    print(f"\nSaved the adapter to {os.path.abspath(args.output_dir)} "
          f"({sum(f.stat().st_size for f in os.scandir(args.output_dir)) / 1e6:.2f} MB); reloaded it in "
          f"{time.perf_counter() - start:.1f} s without clustering; logits identical: {same}")
    if not (unchanged and same):
        raise SystemExit("demo check failed")


def register(commands) -> None:
    """Add `demo` and `count` to the `idlora-trl` subcommands."""
    demo = commands.add_parser("demo", help="adapt SmolLM2-135M with ID-LoRA, print the table, save and reload")
    add_idlora_arguments(demo)
    demo.add_argument("--output-dir", default="outputs/demo-adapter")
    demo.set_defaults(func=cmd_demo)

    count = commands.add_parser("count", help="parameter table of ID-LoRA against LoRA and DoRA")
    count.add_argument("model", help=f"a model directory, a config.json, or one of {', '.join(PRESETS)}")
    add_idlora_arguments(count, r=128)
    count.set_defaults(func=cmd_count)
