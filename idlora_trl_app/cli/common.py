"""What every `idlora-trl` subcommand shares: the one-line error type, and the `IDLoRAConfig` of the parsed ID-LoRA
settings (`idlora_trl.settings.IDLoRAArguments`, the `--idlora_*` options) and target modules."""

from __future__ import annotations

import re
from typing import Optional, Sequence

from idlora_trl.decomposition import SELECTIONS
from idlora_trl.plugins import check_selection
from idlora_trl.settings import METHOD_FIELDS, flag_name, make_config


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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


def _name_the_option(text: str) -> str:
    """'IDLoRAConfig: invalid r=6. ...' -> '--idlora_r: IDLoRAConfig: invalid r=6. ...'."""
    found = re.search(r"invalid (\w+)=", text)
    name = found.group(1) if found else None
    return f"--{flag_name(name)}: {text}" if name in METHOD_FIELDS else text
