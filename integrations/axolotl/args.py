"""Config keys of the ID-LoRA Axolotl plugin, and their validation.

Axolotl merges this model into its config schema (`IDLoRAPlugin.get_input_args`). It declares:

- `idlora:`, a nested block with the ID-LoRA-only settings: every `IDLoRAConfig` field of
  `idlora_trl.settings.METHOD_FIELDS` that Axolotl has no key for (`num_clusters`, alias `k`, `rank_boost`,
  `router`, `router_norm`, `selection`, `distance`, `min_cluster_size`, `seed`, `init_router_std`,
  `indices_path`), derived from the config's fields (defaults, descriptions, choices);
- `rl_adapter_ref_model`, a core Axolotl key that no Axolotl schema declares (up to 0.21), so that it is not
  silently dropped.

With `load_in_4bit` / `load_in_8bit` (QLoRA-style) the validation puts a bitsandbytes `quantization_config` into
Axolotl's `model_kwargs` (Axolotl builds one only for `adapter: qlora` / `lora`); the plugin then clusters the
dequantized weights (`idlora_trl.integrations.bitsandbytes`).

The rank, scaling, dropout and target modules come from Axolotl's usual `lora_r`, `lora_alpha`, `lora_dropout`,
`lora_target_modules` / `lora_target_linear`, and `lora_model_dir` reloads a saved adapter.

Nothing here imports Axolotl: the module works with pydantic and `idlora_trl` alone, and runs with another
`adapter:` pass through unchanged.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from idlora_trl.settings import make_config, method_settings, setting

LOG = logging.getLogger("axolotl.integrations.idlora")

ADAPTER = "idlora"

# Core Axolotl keys that only make sense for LoRA: set with `adapter: idlora`, they would be silently ignored
# or would patch layers that are not there. (`lora_dropout`, `lora_alpha`, ... are used and are not listed.)
LORA_ONLY_KEYS = {
    "lora_target_parameters": "ID-LoRA adapts whole linear modules; use lora_target_modules",
    "lora_fan_in_fan_out": "ID-LoRA reads the layer's own weight layout",
    "lora_rank_pattern": "one rank per adapter only",
    "lora_alpha_pattern": "one lora_alpha per adapter only",
    "peft_use_dora": "DoRA is a LoRA variant",
    "peft_use_rslora": "rsLoRA scaling is a LoRA variant; the ID-LoRA scaling is lora_alpha / lora_r",
    "peft_layer_replication": "not implemented for ID-LoRA",
    "peft_init_lora_weights": "ID-LoRA starts with B = 0 and a small random router",
    "loraplus_lr_ratio": "LoRA+ groups parameters by the names lora_A / lora_B",
    "lora_mlp_kernel": "Axolotl's LoRA kernels expect lora_A / lora_B",
    "lora_qkv_kernel": "Axolotl's LoRA kernels expect lora_A / lora_B",
    "lora_o_kernel": "Axolotl's LoRA kernels expect lora_A / lora_B",
    "lora_embedding_kernel": "Axolotl's LoRA kernels expect lora_A / lora_B",
}


# Settings that Axolotl already has a key for (at the top level of its config); every other ID-LoRA setting is a
# key of the `idlora:` block, named as the `IDLoRAConfig` field (`idlora_trl.settings`), plus the alias `k`.
TOP_LEVEL = {"r": "lora_r", "idlora_alpha": "lora_alpha", "idlora_dropout": "lora_dropout"}
# PEFT's own fields, from Axolotl's usual keys (`target_modules` is resolved by the plugin: lora_target_linear).
PEFT_KEYS = {"modules_to_save": "lora_modules_to_save", "exclude_modules": "lora_exclude_modules",
             "layers_to_transform": "peft_layers_to_transform", "layers_pattern": "peft_layers_pattern",
             "trainable_token_indices": "peft_trainable_token_indices"}
BLOCK_SETTINGS = [item for item in method_settings() if item.name not in TOP_LEVEL]


class _Block(BaseModel):
    """The nested `idlora:` block: the settings that only ID-LoRA has. Defaults are the paper's."""

    model_config = ConfigDict(extra="forbid")

    k: Optional[int] = Field(
        default=None, json_schema_extra={"description": "Number of row clusters k (paper: 4). Alias: num_clusters."})

    @model_validator(mode="before")
    @classmethod
    def _known_keys_and_k(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise ValueError(
                f"idlora: unknown key(s) {unknown}. Allowed keys: {sorted(cls.model_fields)}. The rank, scaling, "
                "dropout and target modules are Axolotl's lora_r, lora_alpha, lora_dropout and lora_target_modules "
                "/ lora_target_linear, at the top level of the config."
            )
        data = dict(data)
        k, num_clusters = data.get("k"), data.get("num_clusters")
        if k is not None and num_clusters is not None and k != num_clusters:
            raise ValueError(f"idlora: k={k!r} and num_clusters={num_clusters!r} disagree; give one of them.")
        value = k if k is not None else num_clusters
        data["k"] = data["num_clusters"] = setting("num_clusters").default if value is None else value
        return data


IDLoRABlock = create_model(
    "IDLoRABlock", __base__=_Block, __module__=__name__,
    **{item.name: (item.annotation, Field(default=item.default, json_schema_extra={"description": item.help}))
       for item in BLOCK_SETTINGS},
)


def build_config(get: Callable[[str], Any], target_modules: Any = None, task_type: str = "CAUSAL_LM"):
    """The `IDLoRAConfig` of an Axolotl config. `get(key)` reads a top-level key (a missing key gives None);
    `target_modules` overrides `lora_target_modules` (the plugin resolves `lora_target_linear`)."""
    block = get("idlora")
    if block is None:
        block = IDLoRABlock()
    if isinstance(block, BaseModel):
        block = block.model_dump()
    block = IDLoRABlock.model_validate({key: value for key, value in dict(block).items() if value is not None})
    values = {item.name: getattr(block, item.name) for item in BLOCK_SETTINGS}
    values.update({name: get(key) for name, key in TOP_LEVEL.items()})
    if target_modules is None:
        target_modules = get("lora_target_modules") or "all-linear"
    peft = {name: get(key) or None for name, key in PEFT_KEYS.items()}
    return make_config(values, target_modules=target_modules, task_type=task_type, **peft)


def _problems(data: Mapping) -> list[str]:
    """What `adapter: idlora` cannot do, given the raw config."""
    problems = []
    if data.get("lora_r") is None:
        problems.append("lora_r is required: the number of skeleton rows kept per cluster (rank r). The paper "
                        "compares ID-LoRA at rank 4p with LoRA at rank p.")
    if data.get("load_in_4bit") and data.get("load_in_8bit"):
        problems.append("load_in_4bit and load_in_8bit are both set: choose one bitsandbytes precision.")
    if data.get("gptq"):
        problems.append("gptq: GPTQ-quantized base models are not supported by ID-LoRA.")
    block = data.get("idlora") if isinstance(data.get("idlora"), Mapping) else {}
    router = block.get("router") or setting("router").default
    if data.get("merge_lora"):
        if router == "token":
            problems.append("merge_lora with idlora.router: token: the token router's update depends on each "
                            "token, so it is not a fixed matrix and cannot be merged into the weights. Serve the "
                            "adapter with PeftModel.from_pretrained, or train with idlora.router: static.")
        elif data.get("merge_method", "memory_efficient") != "legacy":
            problems.append("merge_lora with idlora.router: static needs merge_method: legacy (Axolotl's "
                            "memory-efficient merge reads LoRA weights only).")
    if data.get("relora"):
        problems.append("relora: ReLoRA merges and restarts the adapter periodically; ID-LoRA does not support "
                        "it (the token router cannot merge).")
    for key, why in LORA_ONLY_KEYS.items():
        if data.get(key):
            problems.append(f"{key}: a LoRA-only option ({why}).")
    return problems


def quantization_config(data: Mapping) -> Optional[dict]:
    """The bitsandbytes `quantization_config` (a dict, as `from_pretrained` takes it) for `load_in_4bit` /
    `load_in_8bit` with `adapter: idlora`: Axolotl builds one only for `adapter: qlora` / `lora`. The same settings
    as Axolotl's QLoRA (nf4, double quantization, compute in the training dtype; `bnb_config_kwargs` overrides),
    except the 4-bit storage type, left at bitsandbytes' default (uint8) unless `bnb_config_kwargs` sets it."""
    if data.get("load_in_8bit"):
        return {"quant_method": "bitsandbytes", "load_in_8bit": True}
    if not data.get("load_in_4bit"):
        return None
    if data.get("bf16") is True or (data.get("bf16") == "auto" and _bf16_available()):
        compute = "bfloat16"
    else:
        compute = "float16" if data.get("fp16") is True else "float32"
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": compute, "llm_int8_threshold": 6.0,
            **dict(data.get("bnb_config_kwargs") or {})}


def _bf16_available() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _with_quantization(data: Mapping) -> Mapping:
    """`data` with the bitsandbytes config under Axolotl's `model_kwargs` (passed to `from_pretrained`), unless the
    config already gives one there."""
    config = quantization_config(data)
    key = "overrides_of_model_kwargs" if "overrides_of_model_kwargs" in data else "model_kwargs"
    kwargs = dict(data.get(key) or {})
    if config is None or "quantization_config" in kwargs:
        return data
    LOG.info("adapter: idlora on a bitsandbytes base: quantization_config %s", config)
    return {**data, key: {**kwargs, "quantization_config": config}}


class IDLoRAArgs(BaseModel):
    """Plugin config keys: the `idlora:` block and `rl_adapter_ref_model`."""

    idlora: Optional[IDLoRABlock] = Field(
        default=None,
        json_schema_extra={"description": "ID-LoRA settings, used with `adapter: idlora` (see the plugin README)."})
    rl_adapter_ref_model: Optional[bool] = Field(
        default=None,
        json_schema_extra={"description": "DPO/KTO with an adapter: load an explicit reference model instead of "
                                          "using the policy with its adapter disabled (an Axolotl core key that "
                                          "its schema does not declare)."})

    @model_validator(mode="before")
    @classmethod
    def _check_idlora_run(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        if data.get("adapter") != ADAPTER:
            if data.get("idlora") is not None:
                LOG.warning("The idlora: block is ignored: adapter is %r, not 'idlora'.", data.get("adapter"))
            return data
        problems = _problems(data)
        if problems:
            raise ValueError("adapter: idlora cannot be used as configured:\n  - " + "\n  - ".join(problems))
        if data.get("fsdp") or data.get("fsdp_config"):
            LOG.warning("adapter: idlora with FSDP is untested; DeepSpeed ZeRO-3 is the supported sharded setup.")
        data = dict(_with_quantization(data))
        if data.get("idlora") is None:
            data["idlora"] = {}
        return data

    @model_validator(mode="after")
    def _check_idlora_config(self) -> "IDLoRAArgs":
        if getattr(self, "adapter", None) != ADAPTER:
            return self
        from idlora_trl.decomposition import SELECTIONS
        from idlora_trl.plugins import check_selection

        try:
            config = build_config(lambda key: getattr(self, key, None))
            if config.selection not in SELECTIONS:  # a plugin's strategy: checked now, not when training starts
                check_selection(config.selection)
        except (TypeError, ValueError) as error:
            raise ValueError(f"adapter: idlora: {error} (in an Axolotl config, r is lora_r, idlora_alpha is "
                             "lora_alpha, idlora_dropout is lora_dropout, num_clusters is idlora.k)") from error
        return self
