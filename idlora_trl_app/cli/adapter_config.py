"""The `IDLoRAConfig` of a command line: the parsed ID-LoRA settings (`idlora_trl.settings.IDLoRAArguments`, the
`--idlora_*` options) with TRL's `--lora_target_modules` and `--lora_modules_to_save`."""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

from idlora_trl.decomposition import SELECTIONS
from idlora_trl.plugins import check_selection
from idlora_trl.settings import METHOD_FIELDS, flag_name, make_config

from .errors import UsageError, first_line


def target_list(targets) -> str | list[str]:
    """`--lora_target_modules`: one name (`all-linear`, a regex), several names, or comma-separated names."""
    if isinstance(targets, str):
        targets = [targets]
    names = [name.strip() for item in targets or [] for name in str(item).split(",") if name.strip()]
    if not names:
        raise UsageError("--lora_target_modules is empty; give module names (q_proj v_proj), a regex or all-linear")
    return names[0] if len(names) == 1 and (names[0] == "all-linear" or not names[0].isidentifier()) else names


def idlora_config(idlora, targets, modules_to_save: Optional[Sequence[str]] = None, **overrides):
    """The `IDLoRAConfig` of parsed `IDLoRAArguments`; a bad value is a `UsageError` naming its `--idlora_*` option."""
    values = {**idlora.values(), **overrides}
    try:
        config = make_config(values, target_modules=target_list(targets),
                             modules_to_save=list(modules_to_save) if modules_to_save else None, task_type="CAUSAL_LM")
        if config.selection not in SELECTIONS:  # a plugin's strategy: checked now, not after the model loaded
            check_selection(config.selection)
        return config
    except ValueError as error:
        raise UsageError(_name_the_option(first_line(error))) from None


def peft_config(idlora_args, model_args):
    """The training commands' config: `--idlora_*` with `trl.ModelConfig`'s targets, its index file checked."""
    config = idlora_config(idlora_args, model_args.lora_target_modules, model_args.lora_modules_to_save)
    path = config.indices_path
    if path is not None and not os.path.exists(path):
        raise UsageError(f"--idlora_indices_path {path!r} does not exist; write one with `idlora-trl decompose`")
    return config


def _name_the_option(text: str) -> str:
    """'IDLoRAConfig: invalid r=6. ...' -> '--idlora_r: IDLoRAConfig: invalid r=6. ...'."""
    found = re.search(r"invalid (\w+)=", text)
    name = found.group(1) if found else None
    return f"--{flag_name(name)}: {text}" if name in METHOD_FIELDS else text
