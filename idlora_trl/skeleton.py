"""Which skeleton rows each layer gets: filling the `[k, r]` index tables of an adapter.

In order of preference per layer:
1. another adapter on the same layer with the same decomposition settings: copy its indices (a second
   adapter, or DPO's "ref" copy, never re-clusters);
2. `config.indices_path`: a precomputed index file;
3. a config restored from a saved adapter (`PeftModel.from_pretrained`, `load_adapter`): leave the
   placeholders, the checkpoint's `idlora_indices` fill them;
4. a weight on the meta device: nothing to cluster, leave the placeholders (parameter counts stay exact);
5. otherwise cluster the weight, through the plugin hooks of `hookspecs.py`.

Clustering in several processes (DDP, DeepSpeed ZeRO-3): modules are dealt round-robin to the ranks. For each
group of `world_size` modules, every rank enters the weight context of every module in the same order, naming
the module's owner (under ZeRO-3 that is a collective gather of the shards to the owner alone), and keeps a
float32 copy of its own module only (the tensor the context returned, else `module.weight`), so at most one
gathered weight is held at a time, plus this rank's copies of the current window (about `COPY_BUDGET_BYTES`);
at the end of each window every rank clusters its copies, in parallel. An error on any rank is
shared before the results are, so every rank raises it and none waits forever. `idlora_sync_indices` then
gives every rank every table.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import logging

from .indices import load_indices
from .layer import IDLoRALayer, idlora_layers, weight_rows
from .plugins import check_selection, get_plugin_manager

__all__ = ["decompose", "fill_indices", "get_indices", "idlora_layers"]

logger = logging.get_logger(f"transformers.{__name__}")  # under transformers: its verbosity applies

# With several ranks, each rank keeps float32 copies of its modules' weights until it has about this many bytes
# of them, then clusters them all: ranks wait for each other once per window instead of once per group of
# `world_size` modules (a group waits for its slowest module). One rank clusters each weight at once.
COPY_BUDGET_BYTES = 1 << 30


def rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fill_indices(model: nn.Module, adapter_name: str, peft_configs: dict) -> dict[str, float]:
    """Give every layer of `adapter_name` its indices, by the order of preference above. Returns the timings
    passed to the `idlora_report` hook."""
    config = peft_configs[adapter_name]
    restored, config._restored_from_checkpoint = config._restored_from_checkpoint, False
    spec = config.decomposition_spec()
    donors = [name for name, other in peft_configs.items()
              if name != adapter_name and getattr(other, "decomposition_spec", lambda: None)() == spec]
    from_file = load_indices(config.indices_path, config) if config.indices_path else None
    todo, on_meta = [], 0
    for name, layer in idlora_layers(model, adapter_name):
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


def decompose_layers(layers: list[tuple[str, IDLoRALayer]], adapter_name: str, config) -> float:
    """Cluster each layer's frozen weight (spread over the ranks), make the tables agree across processes,
    and install them. Returns the time it took."""
    check_selection(config.selection)  # a plugin's strategy name is checked here, before any work
    hook = get_plugin_manager().hook
    rank, world = rank_and_world_size()
    start = time.perf_counter()
    # Largest weights first, so that modules clustered side by side have about the same size: under ZeRO-3 a
    # group of `world` gathers is a collective and waits for its slowest module. Same order on every rank.
    layers = sorted(layers, key=lambda item: -(item[1].out_features * item[1].in_features))
    owners = {name: i % world for i, (name, _) in enumerate(layers)}
    mine: dict[str, torch.Tensor] = {}
    error: Optional[str] = None
    bar = logging.tqdm(total=len(layers), desc=f"ID-LoRA decomposition ({config.selection})", unit="module",
                       disable=rank != 0 or None)
    pending: list[tuple[str, torch.Tensor]] = []  # this rank's copies not yet clustered
    window, done, shown = 0.0, 0, 0  # bytes per rank in the current window; modules before it; modules on the bar
    for offset in range(0, len(layers), world):
        group = layers[offset: offset + world]
        for j, (name, layer) in enumerate(group):
            base = layer.get_base_layer()
            # rank j owns module `offset + j` (`owners` above); every rank enters, only the owner reads
            with hook.idlora_weight_context(module=base, module_name=name, owner_rank=j) as full:
                if j == rank and error is None:  # keep a float32 copy: the context may free the weight
                    try:
                        # the tensor the context gave, else `base.weight` (an old plugin's `__enter__` may give `self`)
                        rows = weight_rows(base, full if isinstance(full, torch.Tensor) else None)
                        if type(rows).__name__ == "DTensor":  # no import: torch.distributed.tensor is optional
                            raise ValueError(
                                "its weight is a DTensor (sharded by FSDP2's fully_shard or tensor parallelism), "
                                "which no weight plugin gathers: add the ID-LoRA adapter before sharding the "
                                "model (docs/DISTRIBUTED.md)")
                        if tuple(rows.shape) != (layer.out_features, layer.in_features):
                            raise ValueError(f"the weight context gave shape {tuple(rows.shape)} for "
                                             f"{(layer.out_features, layer.in_features)} rows")
                        pending.append((name, rows.detach().to(torch.float32, copy=True)))
                    except Exception as exc:  # e.g. out of memory: shared below like a clustering error
                        error = f"ID-LoRA could not copy the weight of module {name!r} on rank {rank}: {exc}"
        # Every rank computes the same window (from the shapes alone), so all ranks cluster at the same points
        # and wait for each other once per window, not once per group of `world` modules.
        window += sum(4 * lay.out_features * lay.in_features for _, lay in group) / world
        if window >= (COPY_BUDGET_BYTES if world > 1 else 0) or offset + world >= len(layers):
            for i, (name, weight) in enumerate(pending):
                if error is None:
                    try:
                        indices = hook.idlora_select_rows(weight=weight, module_name=name, config=config)
                        if indices is None:
                            raise ValueError(f"no plugin implements selection={config.selection!r}")
                        mine[name] = torch.as_tensor(indices).cpu()
                    except Exception as exc:  # reported on every rank below, never left to hang the others
                        error = f"ID-LoRA decomposition of module {name!r} failed on rank {rank}: {exc}"
                # the bar (rank 0) counts every rank's modules: the others cluster theirs at the same pace
                step = min(done + (i + 1) * world, offset + len(group)) - shown
                bar.update(step)
                shown += step
            done = offset + len(group)
            bar.update(done - shown)
            shown = done
            pending.clear()
            window = 0.0
    bar.close()
    raise_if_any_rank_failed(error, world)
    computed = hook.idlora_sync_indices(indices=mine, owners=owners, adapter_name=adapter_name)
    for name, layer in layers:
        layer.set_indices(adapter_name, computed[name])
    elapsed = time.perf_counter() - start
    logger.info(f"ID-LoRA: decomposed {len(layers)} module(s) for adapter {adapter_name!r} on {world} rank(s) "
                f"in {elapsed:.2f} s.")
    return elapsed


def raise_if_any_rank_failed(error: Optional[str], world: int) -> None:
    errors = [error]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    errors = [e for e in errors if e is not None]
    if errors:
        raise ValueError(errors[0] if len(errors) == 1 else "\n".join(errors))


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
