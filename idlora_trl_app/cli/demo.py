"""`idlora-trl demo`: adapt the embedded SmolLM2-135M-Instruct with ID-LoRA, print the parameter table against LoRA
and DoRA, save the adapter and reload it (bit-exact, without re-clustering).

```bash
idlora-trl demo --output_dir outputs/demo-adapter
```
The ID-LoRA settings (`--idlora_*`) and `--lora_target_modules` are those of `sft` / `dpo`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from .arguments import adapter_parser

DESCRIPTION = "Adapt SmolLM2-135M with ID-LoRA, print the table, save and reload."


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/demo-adapter", metadata={"help": "Where the adapter is saved."})


def main(idlora_args, target_args, demo_args):
    import torch
    from peft import PeftModel, get_peft_model

    from idlora_trl.counting import count_parameters, format_parameter_table

    from ..smollm2 import load_smollm2, smollm2_path
    from .adapter_config import idlora_config

    config = idlora_config(idlora_args, target_args.lora_target_modules)
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"Loaded SmolLM2-135M-Instruct from {smollm2_path()} in {time.perf_counter() - start:.1f} s")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        base_logits = model(**prompt).logits

    start = time.perf_counter()
    peft_model = get_peft_model(model, config)
    decomposition_s = time.perf_counter() - start
    print(f"\nID-LoRA injected into {len(peft_model.base_model.targeted_module_names)} modules "
          f"(clustering included) in {decomposition_s:.1f} s\n")
    print(format_parameter_table(count_parameters(peft_model, lora_r=target_args.lora_r)))
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
    peft_model.save_pretrained(demo_args.output_dir)
    start = time.perf_counter()
    reloaded = PeftModel.from_pretrained(load_smollm2()[0], demo_args.output_dir)
    with torch.no_grad():
        same = torch.equal(reloaded(**prompt).logits, adapted)
    print(f"\nSaved the adapter to {os.path.abspath(demo_args.output_dir)} "
          f"({sum(f.stat().st_size for f in os.scandir(demo_args.output_dir)) / 1e6:.2f} MB); reloaded it in "
          f"{time.perf_counter() - start:.1f} s without clustering; logits identical: {same}")
    if not (unchanged and same):
        raise SystemExit("demo check failed")


def make_parser(subparsers=None, prog: str | None = None):
    return adapter_parser("demo", (DemoArguments,), {}, DESCRIPTION, subparsers, prog)
