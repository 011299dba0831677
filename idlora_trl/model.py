"""`IDLoRAModel`: injects ID-LoRA layers into a model and computes their skeleton-row indices.

Injection and decomposition are two steps. `_create_and_replace` builds each layer with placeholder indices
(cheap, and all PEFT needs); `inject_adapter` then fills them for the whole model in one pass, in this order
of preference per layer:

1. another adapter on the same layer with the same decomposition settings: copy its indices (a second
   adapter, or DPO's "ref" copy, never re-clusters);
2. `config.indices_path`: a precomputed index file;
3. a config restored from a saved adapter (`PeftModel.from_pretrained`, `load_adapter`): leave the
   placeholders, the checkpoint's `idlora_indices` fill them;
4. a weight on the meta device: nothing to cluster, leave the placeholders (parameter counts stay exact);
5. otherwise cluster the weight, with a progress bar over modules.

The clustering goes through the pluggy hooks of `hookspecs.py` (weight access, row selection, index sync).
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from .config import IDLoRAConfig
from .indices import load_indices
from .layer import IDLoRALayer, Linear, weight_rows
from .peft_type import PREFIX
from .plugins import get_plugin_manager

logger = logging.get_logger(f"transformers.{__name__}")  # under transformers: its verbosity applies


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
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        timings = fill_indices(model, adapter_name, self.peft_config)
        get_plugin_manager().hook.idlora_report(model=model, adapter_name=adapter_name,
                                                config=self.peft_config[adapter_name], timings=timings)


def idlora_layers(model: nn.Module, adapter_name: Optional[str] = None) -> list[tuple[str, IDLoRALayer]]:
    """`(module name in the base model, layer)` for every ID-LoRA layer (holding `adapter_name`, if given)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, IDLoRAModel):
        model = model.model
    return [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, IDLoRALayer) and (adapter_name is None or adapter_name in module.idlora_indices)
    ]


def fill_indices(model: nn.Module, adapter_name: str, peft_configs: dict[str, IDLoRAConfig]) -> dict[str, float]:
    """Give every layer of `adapter_name` its indices, by the order of preference in this module's docstring.
    Returns the timings passed to the `idlora_report` hook."""
    config = peft_configs[adapter_name]
    restored, config._restored_from_checkpoint = config._restored_from_checkpoint, False
    spec = config.decomposition_spec()
    donors = [name for name, other in peft_configs.items()
              if name != adapter_name and getattr(other, "decomposition_spec", lambda: None)() == spec]
    from_file = load_indices(config.indices_path, config) if config.indices_path else None
    layers = idlora_layers(model, adapter_name)
    todo, on_meta = [], 0
    for name, layer in layers:
        donor = next((d for d in donors if d in layer.idlora_indices and layer.has_indices(d)), None)
        if donor is not None:
            layer.set_indices(adapter_name, layer.idlora_indices[donor].clone())
        elif from_file is not None:
            if name not in from_file:
                raise ValueError(
                    f"Index file {config.indices_path!r} has no entry for module {name!r}. It was computed for "
                    "other target modules or another model; regenerate it with `idlora-trl decompose`."
                )
            layer.set_indices(adapter_name, from_file[name])
        elif restored:
            continue
        elif layer.get_base_layer().weight.is_meta:
            on_meta += 1
        else:
            todo.append((name, layer))
    if on_meta:
        logger.info(f"ID-LoRA: {on_meta} module(s) are on the meta device; their indices stay placeholders.")
    elapsed = decompose_layers(todo, adapter_name, config) if todo else 0.0
    return {"decomposition_s": elapsed, "modules": len(todo)}


def decompose_layers(layers: list[tuple[str, IDLoRALayer]], adapter_name: str, config: IDLoRAConfig) -> float:
    """Cluster each layer's frozen weight through the plugins' hooks, make the tables agree across
    processes, and install them. Returns the time it took."""
    hook = get_plugin_manager().hook
    start = time.perf_counter()
    computed = {}
    for name, layer in logging.tqdm(layers, desc=f"ID-LoRA decomposition ({config.selection})", unit="module"):
        base = layer.get_base_layer()
        try:
            with hook.idlora_weight_context(module=base, module_name=name):
                indices = hook.idlora_select_rows(weight=weight_rows(base).detach(), module_name=name, config=config)
        except ValueError as error:
            raise ValueError(f"ID-LoRA decomposition of module {name!r} failed: {error}") from error
        if indices is None:
            raise ValueError(f"No plugin selected rows for module {name!r} with selection={config.selection!r}.")
        computed[name] = indices
    computed = hook.idlora_sync_indices(indices=computed, adapter_name=adapter_name)
    for name, layer in layers:
        layer.set_indices(adapter_name, computed[name])
    elapsed = time.perf_counter() - start
    logger.info(f"ID-LoRA: decomposed {len(layers)} module(s) for adapter {adapter_name!r} in {elapsed:.2f} s.")
    return elapsed


def decompose(model: nn.Module, adapter_name: str = "default", force: bool = False) -> None:
    """Compute the indices of `adapter_name` now: those still missing, or all of them with `force=True`.

    For a model built on the meta device and later given real weights, or an adapter made from a restored
    config without its checkpoint.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel) or adapter_name not in model.peft_config:
        raise ValueError(f"decompose() needs a PeftModel holding the ID-LoRA adapter {adapter_name!r}.")
    layers = [(n, m) for n, m in idlora_layers(model, adapter_name) if force or not m.has_indices(adapter_name)]
    if layers:
        decompose_layers(layers, adapter_name, model.peft_config[adapter_name])


def get_indices(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.LongTensor]:
    """Module name -> `[k, r]` skeleton-row indices of `adapter_name`, for every ID-LoRA layer of `model`."""
    layers = idlora_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"No ID-LoRA layer holds an adapter named {adapter_name!r}.")
    return {name: layer.idlora_indices[adapter_name].detach().cpu().clone() for name, layer in layers}
