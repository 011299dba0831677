"""`IDLoRAModel`: injects ID-LoRA layers into a model.

Injection and decomposition are two steps: `_create_and_replace` builds each layer with placeholder indices
(cheap, and all PEFT needs), then `inject_adapter` fills them for the whole model in one pass
(`skeleton.fill_indices`: reuse, index file, checkpoint, or clustering through the plugin hooks).
"""

from __future__ import annotations

from typing import Optional

from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import IDLoRAConfig
from .layer import IDLoRALayer, Linear, idlora_layers
from .loading import check_model_loaded
from .peft_type import PREFIX
from .plugins import get_plugin_manager
from .precision import autocast_false_error, half_precision_bases
from .skeleton import fill_indices


# The rows of the weight must be readable: bitsandbytes through integrations/bitsandbytes; a GGUF checkpoint is
# dequantized to float weights by transformers as it loads (the model stays marked "gguf").
SUPPORTED_QUANTIZATION = ("bitsandbytes", "gguf")


def check_quantization(model: nn.Module) -> None:
    """Refuse a base quantized by anything but bitsandbytes, naming the scheme (ID-LoRA clusters the rows of the
    dequantized weight and gathers from the layer's output: each scheme needs its own weight plugin)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    if method is not None and str(method) not in SUPPORTED_QUANTIZATION and getattr(model, "is_quantized", True):
        raise ValueError(
            f"ID-LoRA does not support bases quantized with {method!r}: it clusters the rows of each frozen weight, "
            "and only bitsandbytes 4-bit (nf4, fp4) and 8-bit weights are dequantized for that. Load the model "
            "with BitsAndBytesConfig(load_in_4bit=True) or load_in_8bit=True, or unquantized.")


class IDLoRAModel(BaseTuner):
    """Creates an ID-LoRA model from a pretrained transformers model. Use it through `peft.get_peft_model`.

    Example:
        ```py
        >>> import idlora_trl  # registers ID-LoRA with PEFT
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, idlora_trl.IDLoRAConfig(r=32, num_clusters=4, rank_boost=2))
        >>> model.print_trainable_parameters()
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = IDLoRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # ------------------------------------------------------------------ injection

    def _create_and_replace(self, config: IDLoRAConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        if isinstance(target, IDLoRALayer):
            target.update_layer(adapter_name, config, inference_mode=config.inference_mode)
            return
        self._check_supported(target, current_key)
        new_module = Linear(target, adapter_name, config, module_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_supported(self, target: nn.Module, key: str) -> None:
        get_output = getattr(self.model, "get_output_embeddings", None)
        if (get_output is not None and get_output() is target) or key.split(".")[-1] == "lm_head":
            raise ValueError(
                f"ID-LoRA cannot adapt the output layer {key!r}: its rows are the vocabulary and TRL multiplies by "
                "lm_head.weight directly. Remove it from target_modules (target_modules='all-linear' skips it)."
            )
        if isinstance(target, nn.Embedding):
            raise ValueError(
                f"ID-LoRA cannot adapt the embedding {key!r}. Remove it from target_modules; to train embeddings, "
                "list the module in modules_to_save or use trainable_token_indices."
            )
        if not isinstance(target, (nn.Linear, Conv1D)):
            raise ValueError(
                f"ID-LoRA cannot adapt module {key!r} of type {type(target).__name__}: only torch.nn.Linear and "
                "transformers' Conv1D are supported. Narrow target_modules (or use exclude_modules)."
            )

    @staticmethod
    def _prepare_adapter_config(peft_config: IDLoRAConfig, model_config: dict) -> IDLoRAConfig:
        if peft_config.target_modules is None:
            targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_config.get("model_type"))
            peft_config.target_modules = set(targets) if targets else "all-linear"
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        check_quantization(model)
        if "_load_check" not in self.__dict__:  # once per model: a module the loaded file leaves out is an error
            self._load_check = self.register_load_state_dict_post_hook(
                lambda module, incompatible: check_model_loaded(idlora_layers(module.model)))
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        timings = fill_indices(model, adapter_name, self.peft_config)
        get_plugin_manager().hook.idlora_report(model=model, adapter_name=adapter_name,
                                                config=self.peft_config[adapter_name], timings=timings)

    # ------------------------------------------------------------------ PEFT hooks

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """As PEFT's `LoraModel._replace_module`: put `new_module` in place and move the adapter's modules to the
        base weight's device. (`BaseTuner`'s generic version also assigns `child.weight` to an unloaded base
        module, which fails for PEFT's trainable-token wrappers: their `weight` is a computed tensor.)"""
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        weight = getattr(child, "weight", None)
        if weight is None:
            weight = next(child.parameters(), None)
        if weight is None:
            return
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.is_meta for p in module.parameters()):
                module.to(weight.device)

    def check_mergeable(self, adapter_names: Optional[list[str]] = None) -> None:
        """Raise, before anything is merged, if some targeted module cannot merge `adapter_names` (default: the
        active adapters), e.g. a token-router adapter next to static ones. Merging is all or nothing."""
        for _, layer in idlora_layers(self.model):
            layer.check_mergeable(adapter_names)

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        self.check_mergeable()

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self.check_mergeable(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        self.check_mergeable(adapter_names)
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """ID-LoRA's weights are float32 whatever the base dtype (`precision.py`): PEFT's default
        (`autocast_adapter_dtype=True`) is what ID-LoRA does anyway; `False` on a half-precision base is
        refused, and the adapter just added is removed again, so the model is left as it was."""
        if not autocast_adapter_dtype:
            half = half_precision_bases(layer for _, layer in idlora_layers(self.model, adapter_name))
            if half:
                self._remove_adapter(adapter_name)
                raise ValueError(autocast_false_error(half))
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    def _remove_adapter(self, adapter_name: str) -> None:
        if set(self.peft_config) == {adapter_name}:  # get_peft_model / from_pretrained: give the model back as it was
            self._unload_and_optionally_merge(merge=False)
        else:  # add_adapter / load_adapter: the other adapters stay as they were
            active = self.active_adapter
            self.delete_adapter(adapter_name)
            self.active_adapter = active
