"""Differences between the PEFT releases we support (0.20, pinned by Axolotl 0.19, up to the newest).

PEFT 0.21 dispatches saving to the tuner class, so an out-of-tree method saves like any other. PEFT 0.20's
`get_peft_model_state_dict` instead picks a branch per built-in type and ends with
`elif config.peft_type in list(PeftType)` (a plain prefix filter, exactly what ID-LoRA needs) before raising
"Unknown PEFT type". On PEFT < 0.21 we therefore make our member visible to `list(PeftType)`; nothing else
about the enum changes, and newer PEFT is left alone.
"""

from __future__ import annotations

import enum


def peft_dispatches_saving_to_tuners() -> bool:
    from peft.tuners.tuners_utils import BaseTuner

    return hasattr(BaseTuner, "_get_adapter_state_dict")


def make_visible_to_peft_type_listing(member: enum.Enum) -> None:
    """Let `member` appear in `list(peft.PeftType)` (PEFT < 0.21 only; idempotent)."""
    if peft_dispatches_saving_to_tuners():
        return
    from peft.utils.peft_types import PeftType

    if member.name not in PeftType._member_map_:
        PeftType._member_names_.append(member.name)
        PeftType._member_map_[member.name] = member
