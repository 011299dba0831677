"""Checks of an ID-LoRA adapter's tensors as they are set or loaded (`PeftModel.from_pretrained`, `load_adapter`,
`load_state_dict`): every adapted module gets its `B`, its router `T` and an index table of rows of that module.

A problem is one `ValueError` that names the file (when the adapter was loaded from a directory), the module and
what is wrong, raised while loading: never a silent zero update, an out-of-bounds gather in a later forward, or a
forward error that blames the meta device. The layer calls `check_layer_state` from `_load_from_state_dict`; the
tuner calls `check_model_loaded` once the whole state dict is in (a module the file does not mention at all).
Nothing here imports the layer: it receives layers and reads their public tables.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# state-dict key (after the layer's prefix) -> what a user calls it
PARTS = {"idlora_B.{}.weight": "B", "idlora_T.{}.weight": "T (the router)", "idlora_indices.{}": "index table"}
INDICES = "idlora_indices.{}"


def source(layer, adapter_name: str) -> str:
    """Where `adapter_name`'s tensors come from, for messages: the adapter file, or a state dict."""
    folder: Optional[str] = layer.sources.get(adapter_name)
    return f"ID-LoRA adapter file {os.path.join(folder, ADAPTER_WEIGHTS)!r}" if folder else "The state dict loaded"


def missing_indices_error(layer, adapter_name: str, failed_load: bool) -> str:
    where = f"ID-LoRA adapter {adapter_name!r} on module {layer.module_name!r}"
    if failed_load:
        return (f"{where} failed to load (see the error raised then): load a complete adapter again before using it, "
                "or delete it with delete_adapter.")
    return (f"{where} has no skeleton-row indices: none were computed (a model built on the meta device or from a "
            "restored config) and none were loaded (an adapter file without this module's `idlora_indices`). Load a "
            "complete adapter with PeftModel.from_pretrained, or compute the indices with idlora_trl.decompose(model).")


def checked_table(layer, adapter_name: str, indices: torch.Tensor, what: str) -> torch.Tensor:
    """`indices` if it is a `[k, r]` integer table of rows of `layer`, else a ValueError naming the module."""
    k, r, rows, module = layer.num_clusters[adapter_name], layer.r[adapter_name], layer.out_features, layer.module_name
    if tuple(indices.shape) != (k, r):
        raise ValueError(f"{what} for module {module!r} has shape {tuple(indices.shape)}, expected [num_clusters, r] "
                         f"= [{k}, {r}]. Recompute the indices for this configuration.")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"{what} for module {module!r} has dtype {indices.dtype}, not an integer type. Recompute "
                         "the indices with idlora_trl.decompose(model).")
    if not indices.is_meta and indices.numel() and (indices.min() < 0 or indices.max() >= rows):
        low, high = indices.min().item(), indices.max().item()
        raise ValueError(
            f"{what} for module {module!r} holds values in [{low}, {high}], outside this module's rows [0, {rows}): "
            "it was computed for another model, or the file was altered. Recompute the indices for this model "
            "(idlora_trl.decompose, or get_peft_model on the base model) and save the adapter again.")
    return indices


def check_layer_state(layer, state_dict: dict, prefix: str) -> None:
    """Before `layer` loads its part of `state_dict`: for each of its adapters that the state dict mentions, B, T
    and the index table are all there and the table is valid. Marks those adapters' tables ready."""
    for adapter_name in list(layer.idlora_indices.keys()):
        keys = {part: prefix + part.format(adapter_name) for part in PARTS}
        present = [part for part, key in keys.items() if key in state_dict]
        if not present:
            continue
        missing = [PARTS[part] for part in PARTS if part not in present]
        where = source(layer, adapter_name)
        layer.unready(adapter_name)  # stays refused by the forward if this load fails
        if missing:
            raise ValueError(
                f"{where} has no {' and no '.join(missing)} for module {layer.module_name!r} (adapter "
                f"{adapter_name!r}), only {', '.join(PARTS[p] for p in present)}: the file is incomplete (damaged, "
                "edited, or not written by idlora-trl). Save the adapter again from the trained model.")
        checked_table(layer, adapter_name, state_dict[keys[INDICES]], f"{where}: the index table")
        layer.mark_indices_ready(adapter_name, loaded=True)


def check_model_loaded(layers: Iterable[tuple[str, object]]) -> None:
    """After a whole state dict is in: an adapter loaded for some of its modules must have been loaded for all of
    them (B and T come only from the file, even where the index table could be reused); a module the file does
    not mention is an error naming it."""
    layers = list(layers)
    loaded = {name for _, layer in layers for name in layer.loaded_now}
    try:
        for adapter_name in sorted(loaded):
            absent = [name for name, layer in layers
                      if adapter_name in layer.idlora_indices and adapter_name not in layer.loaded_now]
            if absent:
                for _, layer in layers:  # a half-loaded adapter is refused by every forward, not silently used
                    if adapter_name in layer.idlora_indices:
                        layer.unready(adapter_name)
                where = next(source(layer, adapter_name) for _, layer in layers if adapter_name in layer.loaded_now)
                shown = ", ".join(repr(name) for name in absent[:3]) + (f" and {len(absent) - 3} more"
                                                                        if len(absent) > 3 else "")
                raise ValueError(
                    f"{where} holds no tensors for {len(absent)} module(s) that adapter {adapter_name!r} adapts: "
                    f"{shown}. It was saved from another model (fewer layers, other target_modules) or is "
                    "incomplete. Load it on the model it was trained on, or save it again.")
    finally:
        for _, layer in layers:
            layer.loaded_now.clear()
