"""`IDLoRAPlugin`: `adapter: idlora` in an Axolotl config (Axolotl >= 0.17, checked on 0.19.0).

    plugins:
      - idlora_trl.integrations.axolotl.IDLoRAPlugin
    adapter: idlora
    lora_r: 32
    idlora:
      k: 4

How it plugs in (Axolotl's plugin-adapter hooks, no patching):

- `get_adapter_capabilities` declares `idlora`, which makes `adapter: idlora` pass Axolotl's schema check.
  `lora_like=False`: if loading ever declined, Axolotl fails instead of silently training a LoRA.
- `get_input_args` adds the `idlora:` block and `rl_adapter_ref_model` (`args.py`); the checks there reject
  what ID-LoRA cannot do (GPTQ, merging the token router, ReLoRA, LoRA-only options), and with `load_in_4bit` /
  `load_in_8bit` give Axolotl's loader the bitsandbytes config it builds only for LoRA (QLoRA-style ID-LoRA).
- `load_adapter` builds a PEFT model with the native ID-LoRA tuner of `idlora_trl`, so Axolotl's and TRL's
  adapter code paths apply unchanged (adapter-only checkpoints, DPO reference = adapter disabled):
  - SFT: `(get_peft_model(model, IDLoRAConfig), config)`; the clustering runs here, once.
  - DPO/IPO/KTO, where Axolotl asks with `config_only=True`: `(None, IDLoRAConfig)`; TRL applies it.
  - `lora_model_dir`: `PeftModel.from_pretrained(model, dir, is_trainable=not inference)`, indices from the
    checkpoint, no re-clustering. In DPO runs Axolotl only passes a config to TRL (its own LoRA then ignores
    `lora_model_dir`); this plugin passes the saved config and loads the saved weights (indices, B, router)
    into TRL's model in `post_trainer_create`, so DPO continues from the saved adapter without re-clustering.
- Every hook returns at once unless `cfg.adapter == "idlora"`.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.utils.logging import get_logger

from idlora_trl.settings import METHOD_FIELDS

from .args import ADAPTER, build_config

LOG = get_logger("axolotl.integrations.idlora")  # under "axolotl": its handlers print it


def _is_rank_zero() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def _task_type(model: Any) -> str:
    try:
        from axolotl.loaders.adapter import _get_peft_task_type

        return _get_peft_task_type(model)
    except ImportError:  # pragma: no cover - private helper of Axolotl; CAUSAL_LM is what it returns for LMs
        return "CAUSAL_LM"


def _target_modules(model: Any, cfg: Any) -> Any:
    """`lora_target_modules`, plus every linear layer but the output layer with `lora_target_linear`;
    neither: `"all-linear"` (the paper adapts all seven projections of each decoder layer)."""
    modules = cfg.lora_target_modules
    if cfg.lora_target_linear:
        from axolotl.loaders.adapter import find_all_linear_names

        listed = [] if not modules else ([modules] if isinstance(modules, str) else list(modules))
        linear = find_all_linear_names(model)
        LOG.info(f"ID-LoRA: found linear modules {sorted(linear)}")
        return sorted(set(listed) | set(linear))
    return modules or "all-linear"


def build_idlora_config(model: Any, cfg: Any):
    """The `IDLoRAConfig` for an Axolotl config (validated already by `IDLoRAArgs`)."""
    return build_config(cfg.get, target_modules=_target_modules(model, cfg), task_type=_task_type(model))


def _saved_config(model: Any, cfg: Any, inference: bool):
    """The config of the adapter in `lora_model_dir`; it governs (as for Axolotl's LoRA). Warns where the YAML
    asks for other ID-LoRA settings."""
    import idlora_trl
    from peft import PeftConfig

    saved = PeftConfig.from_pretrained(cfg.lora_model_dir)
    if not isinstance(saved, idlora_trl.IDLoRAConfig):
        raise ValueError(f"lora_model_dir {cfg.lora_model_dir!r} holds a {type(saved).__name__}, not an ID-LoRA "
                         "adapter; adapter: idlora can only continue from an ID-LoRA adapter.")
    saved.inference_mode = inference
    try:
        wanted = build_idlora_config(model, cfg)
    except ValueError:
        return saved
    # the settings that shape the saved adapter (scaling, dropout, router init and the index file's path do not)
    keys = [key for key in METHOD_FIELDS if key not in ("idlora_alpha", "idlora_dropout", "init_router_std",
                                                        "indices_path")]
    differ = {key: (getattr(saved, key), getattr(wanted, key)) for key in keys
              if getattr(saved, key) != getattr(wanted, key)}
    if differ:
        LOG.warning("ID-LoRA: the adapter in lora_model_dir was trained with other settings than the config "
                    f"asks for ({', '.join(f'{k}: saved {a!r}, config {b!r}' for k, (a, b) in differ.items())}); "
                    "the saved adapter_config.json governs.")
    return saved


class IDLoRAPlugin(BasePlugin):
    """Axolotl plugin for ID-LoRA (arXiv 2602.20727): `adapter: idlora`."""

    def __init__(self) -> None:
        super().__init__()
        self._resume_dir: Optional[str] = None  # DPO from lora_model_dir: weights loaded after TRL wraps

    def get_input_args(self) -> str:
        return "idlora_trl.integrations.axolotl.args.IDLoRAArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name=ADAPTER, lora_like=False, relora=False)]

    def load_adapter(self, model, cfg, inference: bool = False, config_only: bool = False):
        if cfg.adapter != ADAPTER:
            return None
        from peft import PeftModel, get_peft_model

        kwargs = {}
        if cfg.peft_autocast_adapter_dtype is not None:
            kwargs["autocast_adapter_dtype"] = cfg.peft_autocast_adapter_dtype

        if cfg.lora_model_dir:
            config = _saved_config(model, cfg, inference)
            if config_only:
                # TRL wraps the model with this restored config (placeholders, no clustering);
                # post_trainer_create fills it from the checkpoint.
                self._resume_dir = cfg.lora_model_dir
                return None, config
            LOG.info(f"ID-LoRA: loading the adapter in {cfg.lora_model_dir} (no re-clustering)")
            model = PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=not inference, **kwargs)
            self._report(model)
            return model, model.peft_config["default"]

        config = build_idlora_config(model, cfg)
        if config_only:  # DPO/IPO/KTO: TRL calls get_peft_model; injecting here too would add it twice
            return None, config
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        if quantized and not inference:
            from peft import prepare_model_for_kbit_training  # as Axolotl does for QLoRA before the adapter

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=bool(cfg.gradient_checkpointing))
        model = get_peft_model(model, config, **kwargs)
        self._report(model)
        return model, config

    def post_trainer_create(self, cfg, trainer) -> None:
        if cfg.adapter != ADAPTER or not self._resume_dir:
            return
        directory, self._resume_dir = self._resume_dir, None
        load_saved_weights(trainer.accelerator.unwrap_model(trainer.model), directory)

    @staticmethod
    def _report(model) -> None:
        if _is_rank_zero():
            model.print_trainable_parameters()


def load_saved_weights(model, directory: str, adapter_name: str = "default") -> None:
    """Load a saved ID-LoRA adapter's tensors (indices, B, router) into `adapter_name` of a PeftModel that was
    built from the saved config; checks that every layer got its indices."""
    from peft import PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    from idlora_trl.layer import idlora_layers

    if not isinstance(model, PeftModel):
        raise RuntimeError(f"ID-LoRA: cannot load {directory!r}: the trainer's model is a {type(model).__name__}, "
                           "not the PeftModel TRL should have built from the adapter config.")
    result = set_peft_model_state_dict(model, load_peft_weights(directory, device="cpu"), adapter_name=adapter_name)
    unexpected = [key for key in getattr(result, "unexpected_keys", []) if "idlora_" in key]
    missing = [name for name, layer in idlora_layers(model, adapter_name) if not layer.has_indices(adapter_name)]
    if unexpected or missing:
        raise RuntimeError(f"ID-LoRA: the adapter in {directory!r} does not match the model (unexpected keys "
                           f"{unexpected[:5]}, modules without indices {missing[:5]}).")
    LOG.info(f"ID-LoRA: loaded the adapter in {directory} into the trainer's model (no re-clustering)")
