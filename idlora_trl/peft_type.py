"""ID-LoRA's PEFT type, and its registration with PEFT from outside PEFT's tree.

`peft.register_peft_method` only accepts names that are members of PEFT's own `PeftType` enum, which cannot
be extended at run time. We fill the same lookup tables it fills, with a `str` enum of our own: its member
compares and hashes equal to the string `"IDLORA"` that `adapter_config.json` stores, so PEFT's loaders find
it by that string.
"""

from __future__ import annotations

import enum


class IDLoRAPeftType(str, enum.Enum):
    IDLORA = "IDLORA"

    def __str__(self) -> str:  # json.dumps and f-strings give "IDLORA", like PEFT's own types
        return self.value


PREFIX = "idlora_"


def register_with_peft() -> None:
    """Make PEFT know ID-LoRA. Idempotent; called when `idlora_trl` is imported."""
    from peft import mapping

    from .compat import make_visible_to_peft_type_listing
    from .config import IDLoRAConfig
    from .model import IDLoRAModel

    peft_type = IDLoRAPeftType.IDLORA
    registered = mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is IDLoRAModel:
        return
    if registered is not None:
        raise RuntimeError(
            f"Another PEFT method ({registered.__module__}.{registered.__qualname__}) is already registered as "
            f"{peft_type.value!r}; two ID-LoRA implementations are installed. Uninstall one of them."
        )
    for other_type, other_prefix in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if other_prefix == PREFIX and other_type != peft_type:
            raise RuntimeError(f"PEFT method {other_type!r} already uses the parameter prefix {PREFIX!r}.")
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = IDLoRAConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = IDLoRAModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX
    make_visible_to_peft_type_listing(peft_type)
