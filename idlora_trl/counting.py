"""Trainable-parameter counts of ID-LoRA against LoRA and DoRA on the same modules.

Counts come from module shapes alone, so they are exact on a model built on the meta device and under
ZeRO-3 (where local tensors are empty). Percentages are trainable / (base + trainable), as PEFT prints them.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from .layer import idlora_layers


def idlora_layer_params(d_out: int, r: int, num_clusters: int, rank_boost: int, router: str) -> int:
    """`B` (`d_out/f x r/f`) plus the router (`r` for the token router, `k` for the static one)."""
    return (d_out // rank_boost) * (r // rank_boost) + (r if router == "token" else num_clusters)


def lora_layer_params(d_in: int, d_out: int, r: int) -> int:
    return r * (d_in + d_out)


@dataclass
class ParameterCount:
    base: int
    idlora: int
    lora: int
    dora: int
    r: int
    lora_r: int
    rows: list = field(default_factory=list)  # (module kind, count, d_out, d_in, idlora, lora) per kind

    @staticmethod
    def percent(trainable: int, base: int) -> float:
        return 100.0 * trainable / (base + trainable)


def _numel(param) -> int:
    return getattr(param, "ds_numel", None) or param.numel()


def count_parameters(model: nn.Module, adapter_name: str = "default", lora_r: Optional[int] = None) -> ParameterCount:
    """Count the parameters of the ID-LoRA adapter `adapter_name` of `model` (a `PeftModel`), and those of LoRA
    and DoRA at rank `lora_r` (default `r // 4`, the paper's "ID-LoRA at rank 4p against LoRA at rank p") on the
    same modules."""
    layers = idlora_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"No ID-LoRA layer holds an adapter named {adapter_name!r}; nothing to count.")
    first = layers[0][1]
    r = first.r[adapter_name]
    lora_r = lora_r or max(1, r // 4)
    base = sum(_numel(p) for name, p in model.named_parameters() if ".idlora_" not in name)
    kinds: "OrderedDict[tuple, list]" = OrderedDict()
    total_idlora = total_lora = total_dora = 0
    for name, layer in layers:
        d_out, d_in = layer.out_features, layer.in_features
        n_id = idlora_layer_params(d_out, layer.r[adapter_name], layer.num_clusters[adapter_name],
                                   layer.rank_boost[adapter_name], layer.router[adapter_name])
        n_lora = lora_layer_params(d_in, d_out, lora_r)
        total_idlora += n_id
        total_lora += n_lora
        total_dora += n_lora + d_out  # DoRA adds a magnitude vector of length d_out
        key = (name.split(".")[-1], d_out, d_in)
        entry = kinds.setdefault(key, [0, n_id, n_lora])
        entry[0] += 1
    rows = [(kind, count, d_out, d_in, n_id, n_lora) for (kind, d_out, d_in), (count, n_id, n_lora) in kinds.items()]
    return ParameterCount(base=base, idlora=total_idlora, lora=total_lora, dora=total_dora, r=r, lora_r=lora_r,
                          rows=rows)


def format_parameter_table(count: ParameterCount) -> str:
    """A Markdown table: per module kind, then the totals with their share of the model."""
    lines = [
        f"| module | count | shape (d_out x d_in) | ID-LoRA r={count.r} | LoRA r={count.lora_r} |",
        "|---|---:|---|---:|---:|",
    ]
    for kind, n, d_out, d_in, n_id, n_lora in count.rows:
        lines.append(f"| {kind} | {n} | {d_out} x {d_in} | {n_id:,} | {n_lora:,} |")
    lines += [
        "",
        f"| method | trainable | % of {count.base:,} base parameters (trainable / (base + trainable)) |",
        "|---|---:|---:|",
        f"| ID-LoRA r={count.r} | {count.idlora:,} | {count.percent(count.idlora, count.base):.2f}% |",
        f"| LoRA r={count.lora_r} | {count.lora:,} | {count.percent(count.lora, count.base):.2f}% |",
        f"| DoRA r={count.lora_r} | {count.dora:,} | {count.percent(count.dora, count.base):.2f}% |",
        "",
        f"ID-LoRA trains {count.idlora / count.lora:.1%} of LoRA's parameters.",
    ]
    return "\n".join(lines)


PRESETS = {  # shapes from the public configs; enough to count parameters on the meta device
    "llama-3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=True),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       tie_word_embeddings=False),
}


def meta_model(source: str):
    """A causal LM on the meta device (no weights) from a preset name, a model directory or a config.json: enough
    to count parameters exactly. Raises `ValueError` for a source it cannot read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if source in PRESETS:
        preset = dict(PRESETS[source])
        config = AutoConfig.for_model(preset.pop("model_type"), **preset)
    elif os.path.isdir(source) or os.path.isfile(source):
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read a model config from {source!r}: {error}") from error
    else:
        raise ValueError(f"{source!r} is neither a model directory, a config.json, nor one of {sorted(PRESETS)}")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
