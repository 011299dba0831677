"""idlora-trl: ID-LoRA (arXiv 2602.20727) as a native PEFT method, for PEFT, TRL, DeepSpeed and Axolotl.

Importing this package registers ID-LoRA with PEFT, so `peft.get_peft_model(model, IDLoRAConfig(...))`,
`PeftModel.from_pretrained` and TRL's `peft_config=` work as they do for LoRA. Importing it changes nothing else:
no environment variable, no logging set-up (the `idlora-trl` command is the app, `idlora_trl_app`).
"""

from .config import IDLoRAConfig
from .counting import count_parameters, format_parameter_table, meta_model
from .indices import read_indices, save_indices
from .layer import IDLoRALayer
from .model import IDLoRAModel
from .overflow import overflow_check
from .peft_type import IDLoRAPeftType
from .registration import register_with_peft
from .skeleton import decompose, get_indices

__version__ = "0.1.0"

register_with_peft()

_TRAINERS = ("IDLoRASFTTrainer", "IDLoRADPOTrainer")  # TRL is imported on first use


def __getattr__(name: str):
    if name in _TRAINERS:
        from . import trainers

        return getattr(trainers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IDLoRAConfig",
    "IDLoRADPOTrainer",
    "IDLoRASFTTrainer",
    "IDLoRALayer",
    "IDLoRAModel",
    "IDLoRAPeftType",
    "count_parameters",
    "decompose",
    "format_parameter_table",
    "get_indices",
    "meta_model",
    "overflow_check",
    "read_indices",
    "save_indices",
]
