"""`idlora-trl decompose`: cluster a model once and write the index file that later runs reuse.

```bash
idlora-trl decompose --model_name_or_path DIR --idlora_r 32 --output indices.safetensors
idlora-trl sft --model_name_or_path DIR --idlora_indices_path indices.safetensors ...   # no clustering
```
The ID-LoRA settings (`--idlora_*`) and `--lora_target_modules` are those of `sft` / `dpo` (default: the main job's
targets and rank); `--config FILE.yaml` works here too. `IDLoRAConfig(indices_path=...)` reads the file as well.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

from ..defaults import DEFAULT_TARGETS, SFT_DEFAULTS
from .arguments import HELP, adapter_parser

DESCRIPTION = "Cluster a model once and write its ID-LoRA index file."


@dataclass
class DecomposeArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": HELP["model_name_or_path"]})
    output: Optional[str] = field(default=None, metadata={
        "help": "Index file to write (default: outputs/indices-<model>-r<r>-k<k>-<selection>.safetensors)."})


def main(idlora_args, target_args, decompose_args):
    from peft import get_peft_model

    from idlora_trl import get_indices, save_indices  # the public API (module layout may change)

    from .adapter_config import idlora_config
    from .errors import UsageError, first_line
    from .model import load_model
    from .printing import seconds

    if idlora_args.idlora_indices_path is not None:
        raise UsageError("--idlora_indices_path reads an index file; decompose writes one (--output)")
    peft_config = idlora_config(idlora_args, target_args.lora_target_modules)
    start = time.perf_counter()
    model, _, label = load_model(decompose_args.model_name_or_path)
    output = decompose_args.output or os.path.join(
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


def make_parser(subparsers=None, prog: str | None = None):
    defaults = dict(idlora_r=SFT_DEFAULTS["idlora_r"], lora_target_modules=DEFAULT_TARGETS.split(","))
    return adapter_parser("decompose", (DecomposeArguments,), defaults, DESCRIPTION, subparsers, prog)
