"""Index files: the `[k, r]` skeleton-row tables of a whole model, computed once and reused.

A safetensors file with one int64 tensor per module (named as in the base model, e.g.
`model.layers.0.self_attn.q_proj`) and the decomposition settings in its metadata. Loading checks both.
A saved ID-LoRA adapter, or a Trainer checkpoint of one, is read the same way: its `adapter_model.safetensors`
holds the tables (`...q_proj.idlora_indices`) and its `adapter_config.json` the settings, so resuming from a
checkpoint or starting from a saved adapter never clusters again.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "idlora-indices/1"


def save_indices(path: str | os.PathLike, indices: dict[str, torch.Tensor], spec: dict) -> None:
    """Write `indices` (module name -> `[k, r]`) with the decomposition `spec` (`IDLoRAConfig.decomposition_spec()`)."""
    tensors = {name: t.detach().to("cpu", torch.long).contiguous() for name, t in indices.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT, "spec": json.dumps(spec, sort_keys=True)})


ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def read_adapter_indices(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The tables and settings of a saved ID-LoRA adapter (or checkpoint) directory: `(module name -> [k, r], spec)`."""
    weights, config_file = os.path.join(path, ADAPTER_WEIGHTS), os.path.join(path, ADAPTER_CONFIG)
    if not (os.path.isfile(weights) and os.path.isfile(config_file)):
        raise ValueError(f"{str(path)!r} is a directory without {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}: neither an "
                         "index file nor a saved ID-LoRA adapter or checkpoint.")
    with open(config_file, encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("peft_type") != "IDLORA":
        raise ValueError(f"{str(path)!r} holds a {config.get('peft_type')} adapter, not an ID-LoRA one.")
    suffix, prefix = ".idlora_indices", "base_model.model."
    try:
        with safe_open(weights, framework="pt") as handle:
            tables = {name[:-len(suffix)].removeprefix(prefix): handle.get_tensor(name)
                      for name in handle.keys() if name.endswith(suffix)}
    except Exception as error:  # safetensors raises several types for a damaged file
        raise ValueError(f"{weights!r} is not a readable safetensors file ({error}): the adapter or checkpoint is "
                         "damaged (an interrupted write?). Use another checkpoint, or save the adapter again.") \
            from error
    from .config import IDLoRAConfig

    return tables, {key: config.get(key) for key in IDLoRAConfig().decomposition_spec()}


def read_indices(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an index file, or the tables of a saved adapter or checkpoint directory: `(module name -> [k, r], spec)`."""
    if os.path.isdir(path):
        return read_adapter_indices(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ID-LoRA index file {str(path)!r} does not exist. Write one with `idlora-trl decompose` or "
            "idlora_trl.save_indices(), or unset indices_path to cluster now."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises several types for a damaged file
        raise ValueError(f"ID-LoRA index file {str(path)!r} is not a readable safetensors file: {error}") from error
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an ID-LoRA index file (format {metadata.get('format')!r}, "
                         f"expected {FORMAT!r}).")
    return tensors, json.loads(metadata["spec"])


def load_indices(path: str | os.PathLike, config) -> dict[str, torch.Tensor]:
    """Read an index file and check that it was computed with `config`'s decomposition settings."""
    tensors, spec = read_indices(path)
    expected = config.decomposition_spec()
    diff = {key: (spec.get(key), value) for key, value in expected.items() if spec.get(key) != value}
    if diff:
        details = ", ".join(f"{key}: file {file!r} vs config {want!r}" for key, (file, want) in sorted(diff.items()))
        raise ValueError(
            f"ID-LoRA index file {str(path)!r} was computed with other settings ({details}). Use the same "
            "settings in IDLoRAConfig, or recompute the file for these settings."
        )
    return tensors
