"""`idlora-trl decompose`, `count` and `demo`: the ID-LoRA settings (`--idlora_*`) and `--lora_target_modules`, as
for `sft` / `dpo`, and a few options each; `--config FILE.yaml` works here too.

- `idlora-trl decompose`: clusters a model once and writes the index file that later runs reuse with
  `--idlora_indices_path` (or `IDLoRAConfig(indices_path=...)`).
- `idlora-trl count`: the parameter table for a model path, a config file, or a known architecture, built on
  the meta device (no weights are read).
- `idlora-trl demo`: adapts the embedded SmolLM2-135M-Instruct with ID-LoRA, prints the parameter table
  against LoRA and DoRA, saves the adapter and reloads it (bit-exact, without re-clustering).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

from idlora_trl.counting import PRESETS
from idlora_trl.settings import IDLoRAArguments

from ..defaults import DEFAULT_TARGETS, SFT_DEFAULTS
from .common import UsageError, first_line, idlora_config
from .parser import HELP, check_values, parse_with, parser_class


@dataclass
class Targets:
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"],
                                           metadata={"help": HELP["lora_target_modules"]})
    lora_r: Optional[int] = field(default=None, metadata={"help": HELP["lora_r"]})


@dataclass
class DecomposeArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": HELP["model_name_or_path"]})
    output: Optional[str] = field(default=None, metadata={
        "help": "Index file to write (default: outputs/indices-<model>-r<r>-k<k>-<selection>.safetensors)."})


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/demo-adapter", metadata={"help": "Where the adapter is saved."})


COMMANDS = {  # name: (help, its dataclasses, its defaults)
    "decompose": ("cluster a model once and write its ID-LoRA index file", (DecomposeArguments,),
                  dict(idlora_r=SFT_DEFAULTS["idlora_r"], lora_target_modules=DEFAULT_TARGETS.split(","))),
    "count": ("parameter table of ID-LoRA against LoRA and DoRA, on the meta device", (), dict(idlora_r=128)),
    "demo": ("adapt SmolLM2-135M with ID-LoRA, print the table, save and reload", (DemoArguments,), {}),
}


def make_parser(command: str):
    description, own, defaults = COMMANDS[command]
    parser = parser_class(lambda _, namespace: check_values(namespace))(
        (IDLoRAArguments, Targets, *own), prog=f"idlora-trl {command}", allow_abbrev=False,
        description=f"{description[0].upper()}{description[1:]}.")
    if command == "count":
        parser.add_argument("model", help=f"a model directory, a config.json, or one of {', '.join(PRESETS)}")
    parser.set_defaults(**defaults)
    return parser


def parse(command: str, argv: list[str]):
    return parse_with(make_parser(command), argv)


# ---------------------------------------------------------------------------------------- decompose
def cmd_decompose(argv: list[str]) -> None:
    from peft import get_peft_model

    from idlora_trl import get_indices, save_indices  # the public API (module layout may change)
    from .runtime import load_model, seconds

    idlora, targets, args = parse("decompose", argv)
    if idlora.idlora_indices_path is not None:
        raise UsageError("--idlora_indices_path reads an index file; decompose writes one (--output)")
    peft_config = idlora_config(idlora, targets.lora_target_modules)
    start = time.perf_counter()
    model, _, label = load_model(args.model_name_or_path)
    output = args.output or os.path.join(
        "outputs", f"indices-{label}-r{peft_config.r}-k{peft_config.num_clusters}-{peft_config.selection}.safetensors")
    if os.path.isdir(output):
        raise UsageError(f"--output {output!r} is a directory; give a file name")
    t0 = time.perf_counter()
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as error:
        raise UsageError(first_line(error)) from error
    clustering_s = time.perf_counter() - t0
    indices = get_indices(peft_model)
    save_indices(output, indices, peft_config.decomposition_spec())
    print(f"Clustered {len(indices)} modules of {label} ({peft_config.selection}, r={peft_config.r}, "
          f"k={peft_config.num_clusters}) in {clustering_s:.1f} s; wrote {os.path.abspath(output)}")
    print(f"Reuse it with: idlora-trl sft --idlora_indices_path {output}  (or IDLoRAConfig(indices_path=...)); "
          f"total {seconds(start)}")


# -------------------------------------------------------------------------------------------- count
def cmd_count(argv: list[str]) -> None:
    from peft import get_peft_model

    from idlora_trl.counting import count_parameters, format_parameter_table, meta_model

    idlora, targets, rest = parse("count", argv)
    config = idlora_config(idlora, targets.lora_target_modules)
    try:
        model = meta_model(rest.model)
        peft_model = get_peft_model(model, config)
    except ValueError as error:
        raise UsageError(first_line(error)) from error
    print(format_parameter_table(count_parameters(peft_model, lora_r=targets.lora_r)))


# --------------------------------------------------------------------------------------------- demo
def cmd_demo(argv: list[str]) -> None:
    import torch
    from peft import PeftModel, get_peft_model

    from idlora_trl.counting import count_parameters, format_parameter_table
    from ..smollm2 import load_smollm2, smollm2_path

    idlora, targets, args = parse("demo", argv)
    config = idlora_config(idlora, targets.lora_target_modules)
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
    print(format_parameter_table(count_parameters(peft_model, lora_r=targets.lora_r)))
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
