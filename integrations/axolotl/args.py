"""Config keys of the ID-LoRA Axolotl plugin, and their validation.

Axolotl merges this model into its config schema (`IDLoRAPlugin.get_input_args`). It declares:

- `idlora:`, a nested block with the ID-LoRA-only settings (`k` / `num_clusters`, `rank_boost`, `router`,
  `selection`, `distance`, `min_cluster_size`, `seed`, `init_router_std`, `indices_path`);
- `rl_adapter_ref_model`, a core Axolotl key that no Axolotl schema declares (up to 0.21), so that it is not
  silently dropped.

The rank, scaling, dropout and target modules come from Axolotl's usual `lora_r`, `lora_alpha`, `lora_dropout`,
`lora_target_modules` / `lora_target_linear`, and `lora_model_dir` reloads a saved adapter.

Nothing here imports Axolotl: the module works with pydantic alone, and runs with another `adapter:` pass
through unchanged.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class IDLoRABlock(BaseModel):
    """The nested `idlora:` block: the settings that only ID-LoRA has. Defaults are the paper's."""

    model_config = ConfigDict(extra="forbid")

    k: Optional[int] = Field(
        default=None, ge=1,
        json_schema_extra={"description": "Number of row clusters k (paper: 4). Alias: num_clusters."})
    num_clusters: Optional[int] = Field(
        default=None, ge=1, json_schema_extra={"description": "Same as k; give one of them."})
    rank_boost: int = Field(
        default=2, ge=1,
        json_schema_extra={"description": "Rank-boost factor f (paper: 2). lora_r must be divisible by it."})
    router: Literal["token", "static"] = Field(
        default="token",
        json_schema_extra={"description": "'token' (paper; cannot be merged) or 'static' (one weight per "
                                          "cluster; can be merged with merge_method: legacy)."})
    selection: str = Field(
        default="pmrc",
        json_schema_extra={"description": "Skeleton-row selection: 'pmrc' (paper), 'random', 'sequential', or "
                                          "a strategy from an idlora_trl plugin."})
    distance: Literal["euclidean", "cosine"] = Field(
        default="euclidean", json_schema_extra={"description": "Clustering distance (paper: euclidean)."})
    min_cluster_size: Optional[int] = Field(
        default=None, ge=1,
        json_schema_extra={"description": "Minimum rows per cluster (default: lora_r; must be >= lora_r)."})
    seed: int = Field(default=0, json_schema_extra={"description": "Seed of the clustering."})
    init_router_std: Optional[float] = Field(
        default=None, gt=0, json_schema_extra={"description": "Std of the token router's initial T (default 1/r)."})
    indices_path: Optional[str] = Field(
        default=None,
        json_schema_extra={"description": "Precomputed index file (`idlora-trl decompose`): skips clustering."})

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
        data["k"] = data["num_clusters"] = 4 if value is None else value
        return data


def idlora_config_kwargs(get: Callable[[str], Any], target_modules: Any = None) -> dict:
    """`IDLoRAConfig` keyword arguments from an Axolotl config. `get(key)` reads a top-level key (a missing key
    gives None); `target_modules` overrides `lora_target_modules` (the plugin resolves `lora_target_linear`)."""
    block = get("idlora")
    if block is None:
        block = IDLoRABlock()
    if isinstance(block, BaseModel):
        block = block.model_dump()
    block = IDLoRABlock.model_validate({key: value for key, value in dict(block).items() if value is not None})
    block = block.model_dump()
    if target_modules is None:
        target_modules = get("lora_target_modules") or "all-linear"
    kwargs = {
        "r": get("lora_r"),
        "num_clusters": block["k"],
        "rank_boost": block["rank_boost"],
        "idlora_alpha": get("lora_alpha"),
        "idlora_dropout": get("lora_dropout") or 0.0,
        "router": block["router"],
        "selection": block["selection"],
        "distance": block["distance"],
        "min_cluster_size": block.get("min_cluster_size"),
        "seed": block["seed"],
        "init_router_std": block.get("init_router_std"),
        "indices_path": block.get("indices_path"),
        "target_modules": target_modules,
        "modules_to_save": get("lora_modules_to_save") or None,
        "exclude_modules": get("lora_exclude_modules") or None,
        "layers_to_transform": get("peft_layers_to_transform"),
        "layers_pattern": get("peft_layers_pattern"),
        "trainable_token_indices": get("peft_trainable_token_indices"),
    }
    return {key: value for key, value in kwargs.items() if value is not None}


def _problems(data: Mapping) -> list[str]:
    """What `adapter: idlora` cannot do, given the raw config."""
    problems = []
    if data.get("lora_r") is None:
        problems.append("lora_r is required: the number of skeleton rows kept per cluster (rank r). The paper "
                        "compares ID-LoRA at rank 4p with LoRA at rank p.")
    for key in ("load_in_4bit", "load_in_8bit"):
        if data.get(key):
            problems.append(f"{key}: ID-LoRA needs a full-precision (or bf16/fp16) base model: its skeleton rows "
                            "are rows of the frozen weight, read by clustering and gathered from the layer output. "
                            "Remove it, or use adapter: qlora.")
    if data.get("gptq"):
        problems.append("gptq: GPTQ-quantized base models are not supported by ID-LoRA.")
    block = data.get("idlora") if isinstance(data.get("idlora"), Mapping) else {}
    router = block.get("router") or "token"
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
        if data.get("idlora") is None:
            data = dict(data)
            data["idlora"] = {}
        return data

    @model_validator(mode="after")
    def _check_idlora_config(self) -> "IDLoRAArgs":
        if getattr(self, "adapter", None) != ADAPTER:
            return self
        import idlora_trl  # registers ID-LoRA with PEFT; its config checks the values

        kwargs = idlora_config_kwargs(lambda key: getattr(self, key, None))
        try:
            idlora_trl.IDLoRAConfig(task_type="CAUSAL_LM", **kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"adapter: idlora: {error} (in an Axolotl config, r is lora_r, idlora_alpha is "
                             "lora_alpha, idlora_dropout is lora_dropout, num_clusters is idlora.k)") from error
        return self
