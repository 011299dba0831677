"""TRL trainers with ID-LoRA: `IDLoRASFTTrainer` and `IDLoRADPOTrainer`.

They take the same arguments as `trl.SFTTrainer` and `trl.DPOTrainer`. An `IDLoRAConfig` comes in as
`peft_config` (the default is `IDLoRAConfig()` when the model carries no ID-LoRA adapter yet); TRL wraps the
model with `peft.get_peft_model`, which runs the decomposition through the plugin hooks (progress bar over
modules, index sync across ranks, report in the log). The parameter table against LoRA is printed once.

DPO for safety alignment: with `ref_model=None` and a fresh adapter, the reference is the same model with the
adapter disabled. A model that already is a `PeftModel` with an ID-LoRA adapter also works: TRL then adds a
"ref" adapter with the same config (which reuses the policy's indices) and copies the `.default.` parameters
(`idlora_B`, `idlora_T`) into it; this trainer checks that the copy is complete.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft import PeftConfig, PeftModel
from transformers.utils import logging
from trl import DPOTrainer, SFTTrainer

from .config import IDLoRAConfig
from .counting import count_parameters, format_parameter_table
from .layer import idlora_layers
from .overflow import overflow_check

logger = logging.get_logger(f"transformers.{__name__}")  # under transformers: its verbosity applies


def _has_idlora_adapter(model: Any) -> bool:
    return isinstance(model, PeftModel) and any(isinstance(c, IDLoRAConfig) for c in model.peft_config.values())


def resolve_peft_config(model: Any, peft_config: Optional[PeftConfig], trainer: str) -> Optional[IDLoRAConfig]:
    """The config TRL should apply: the given `IDLoRAConfig`, a default one, or none for a wrapped model."""
    if peft_config is not None and not isinstance(peft_config, IDLoRAConfig):
        raise TypeError(
            f"{trainer} trains ID-LoRA adapters, but peft_config is a {type(peft_config).__name__}. Pass an "
            f"idlora_trl.IDLoRAConfig, or use trl.{trainer.removeprefix('IDLoRA')} for other PEFT methods."
        )
    if peft_config is None and not _has_idlora_adapter(model):
        if isinstance(model, PeftModel):
            raise TypeError(f"{trainer} got a PeftModel without an ID-LoRA adapter; pass the base model instead.")
        logger.info(f"{trainer}: no peft_config given, using IDLoRAConfig() defaults.")
        return IDLoRAConfig(task_type="CAUSAL_LM")
    return peft_config


def seed_before_wrapping(args: Any, positional: tuple) -> None:
    """`transformers.set_seed(args.seed)` before TRL wraps the model: PEFT draws the router `T` at random, and older
    TRL (1.9, Axolotl's pin) wraps the model before the Trainer seeds, so two runs of one script would start from
    different routers. Newer TRL (1.16) seeds there itself; seeding twice changes nothing."""
    from transformers import TrainingArguments, set_seed

    args = args if args is not None else (positional[0] if positional else None)
    set_seed(getattr(args, "seed", TrainingArguments.__dataclass_fields__["seed"].default))


class _IDLoRATrainerMixin:
    def training_step(self, model, inputs, *args: Any, **kwargs: Any) -> torch.Tensor:
        """TRL's step; when its loss is not finite, the step's batch runs again under `overflow_check`, so that an
        ID-LoRA update that overflowed is reported by module name (FloatingPointError) before the optimizer step.
        The forward itself never checks (no host sync per module). Reading the loss costs one host sync per step,
        which the Trainer pays anyway (`logging_nan_inf_filter`)."""
        batch = dict(inputs)  # compute_loss may pop keys from the dict it is given
        loss = super().training_step(model, inputs, *args, **kwargs)
        if not torch.isfinite(loss).all():
            with overflow_check(model), torch.no_grad():
                self.compute_loss(model, self._prepare_inputs(batch))  # raises FloatingPointError, naming the module
            logger.warning("The training loss is not finite, and no ID-LoRA update overflowed: the base model's "
                           "own output is not finite on this batch.")
        return loss

    def _warn_if_fsdp_was_dropped(self) -> None:
        """transformers turns FSDP off without a word where accelerate cannot run it (on a CPU it runs DDP)."""
        if getattr(self.args, "fsdp", None) and not getattr(self, "is_fsdp_enabled", False):
            logger.warning(
                f"FSDP was asked for (fsdp={self.args.fsdp!r}), but accelerate does not run it here (distributed "
                f"type {self.accelerator.distributed_type.value}; on a CPU it never does): every process holds the "
                "whole model and the gradients are all-reduced, which trains ID-LoRA the same way. To shard on a "
                "CPU, wrap the model with torch's fully_shard yourself (docs/DISTRIBUTED.md).")

    def _report_parameters(self) -> None:
        if not self.is_world_process_zero():
            return
        model = self.accelerator.unwrap_model(self.model)
        for name in model.active_adapters:
            print(f"ID-LoRA adapter {name!r}:\n{format_parameter_table(count_parameters(model, name))}")


class IDLoRASFTTrainer(_IDLoRATrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` for ID-LoRA adapters. Same arguments; `peft_config` must be an `IDLoRAConfig`."""

    _tag_names = ["trl", "sft", "idlora"]

    def __init__(self, model, *args: Any, peft_config: Optional[PeftConfig] = None, **kwargs: Any) -> None:
        peft_config = resolve_peft_config(model, peft_config, type(self).__name__)
        seed_before_wrapping(kwargs.get("args"), args)
        super().__init__(model, *args, peft_config=peft_config, **kwargs)
        self._warn_if_fsdp_was_dropped()
        self._report_parameters()


class IDLoRADPOTrainer(_IDLoRATrainerMixin, DPOTrainer):
    """`trl.DPOTrainer` for ID-LoRA adapters (safety alignment: the reference is the base model with the
    adapter disabled, or a frozen copy of a pre-trained adapter). Same arguments; `peft_config` must be an
    `IDLoRAConfig`."""

    _tag_names = ["trl", "dpo", "idlora"]

    def __init__(self, model, ref_model=None, *args: Any, peft_config: Optional[PeftConfig] = None,
                 **kwargs: Any) -> None:
        peft_config = resolve_peft_config(model, peft_config, type(self).__name__)
        seed_before_wrapping(kwargs.get("args"), args)
        super().__init__(model, ref_model, *args, peft_config=peft_config, **kwargs)
        unwrapped = self.accelerator.unwrap_model(self.model)
        if "ref" in getattr(unwrapped, "peft_config", {}):
            self._check_ref_copy(unwrapped)
        self._warn_if_fsdp_was_dropped()
        self._report_parameters()

    @staticmethod
    def _check_ref_copy(model: PeftModel) -> None:
        """TRL's "ref" adapter must be an exact frozen copy of "default": same indices, B and T.

        Also re-enables training of "default": PEFT < 0.21 freezes the active adapter when another one is
        added in inference mode.
        """
        for name, layer in idlora_layers(model, "ref"):
            if not torch.equal(layer.idlora_indices["ref"], layer.idlora_indices["default"]):
                raise RuntimeError(f"DPO reference adapter of module {name!r} has other indices than the policy.")
            for container in (layer.idlora_B, layer.idlora_T):
                if not torch.equal(container["ref"].weight, container["default"].weight):
                    raise RuntimeError(f"DPO reference adapter of module {name!r} is not a copy of the policy.")
                container["ref"].requires_grad_(False)
                if not model.peft_config["default"].inference_mode:
                    container["default"].requires_grad_(True)
