"""ID-LoRA's PEFT type and parameter prefix (registration with PEFT is in `registration.py`).

`peft.register_peft_method` only accepts names that are members of PEFT's own `PeftType` enum, which cannot
be extended at run time, so ID-LoRA uses a `str` enum of its own: its member compares and hashes equal to the
string `"IDLORA"` that `adapter_config.json` stores, so PEFT's loaders find it by that string.
"""

from __future__ import annotations

import enum


class IDLoRAPeftType(str, enum.Enum):
    IDLORA = "IDLORA"

    def __str__(self) -> str:  # json.dumps and f-strings give "IDLORA", like PEFT's own types
        return self.value


PREFIX = "idlora_"
