"""ID-LoRA's registration with PEFT, from outside PEFT's tree (called when `idlora_trl` is imported).

We fill the lookup tables `peft.register_peft_method` fills (it only accepts members of PEFT's own `PeftType`),
keyed by `IDLoRAPeftType.IDLORA`, which equals the string `"IDLORA"` stored in `adapter_config.json`.
"""

from __future__ import annotations

from peft import mapping

from .compat import make_visible_to_peft_type_listing
from .config import IDLoRAConfig
from .model import IDLoRAModel
from .peft_type import PREFIX, IDLoRAPeftType


def register_with_peft() -> None:
    """Make PEFT know ID-LoRA. Idempotent."""
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
