"""All of idlora-trl's pluggy hooks, in one place.

A plugin is any object (a module, a class instance) with functions named like these, marked with
`idlora_trl.hookspecs.hookimpl`. Register it with `idlora_trl.plugins.get_plugin_manager().register(obj)`, or
ship it in a package with an entry point in the group `idlora_trl`:

    [project.entry-points.idlora_trl]
    my_rows = "my_package.my_module"

The built-in plugins (`idlora_trl/builtin_plugins.py`: the four row-selection strategies, plain weight access,
the index exchange and the report) are registered the same way, and so is the DeepSpeed ZeRO-3 weight context
(`integrations/deepspeed/plugin.py`, through the entry point); a plugin can add a strategy or override a
built-in one (`@hookimpl(tryfirst=True)`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Optional

import pluggy
import torch
from torch import nn

hookspec = pluggy.HookspecMarker("idlora_trl")
hookimpl = pluggy.HookimplMarker("idlora_trl")


@hookspec
def idlora_selection_names() -> list[str]:
    """The values of `IDLoRAConfig.selection` this plugin implements (e.g. `["pmrc"]`).

    `IDLoRAConfig` checks the built-in names itself (and refuses near misses of them) without starting the plugin
    manager; any other name is checked against these answers when rows are selected (`plugins.check_selection`),
    and by the command line and the Axolotl plugin when they build the config. Plugin names must not be near
    misses of built-in ones (`"PMRC"`, `"pmrc_qr"`): the config takes those for typos.
    """


@hookspec(firstresult=True)
def idlora_select_rows(weight: torch.Tensor, module_name: str, config) -> Optional[torch.LongTensor]:
    """Choose the skeleton rows of one frozen weight.

    `weight` is the full `[d_out, d_in]` weight (rows are the points; transformers' `Conv1D` is already
    transposed), read-only, on its own device. `config` is the adapter's `IDLoRAConfig`. Return a
    `[config.num_clusters, config.r]` int64 tensor of row indices, or `None` to let the next plugin decide
    (a strategy answers only for the `config.selection` values it named). The first non-`None` answer wins.
    """


@hookspec(firstresult=True)
def idlora_weight_context(module: nn.Module, module_name: str, owner_rank: int) -> Optional[AbstractContextManager]:
    """A context manager inside which rank `owner_rank` can read the full weight of `module`, read-only.

    Entered once per module on every rank, in the same module order; `owner_rank` (a global rank) is the one
    rank that reads the weight, the others only take part (e.g. in a collective). `__enter__` returns either
    the full weight in the module's stored layout (`[d_out, d_in]` for `nn.Linear`, `[d_in, d_out]` for
    transformers' `Conv1D`), valid on `owner_rank` and only inside the context, or `None` (or anything that is
    not a tensor, such as an older plugin's `self`): then `module.weight` is read and must hold the full weight.
    The built-in one is `contextlib.nullcontext()` (the weight is already there); the DeepSpeed plugin gathers a
    ZeRO-3 partitioned weight to `owner_rank` alone and returns it there. An implementation may leave
    `owner_rank` out of its signature (pluggy passes only the arguments it names).
    Return `None` if this plugin does not handle `module`.
    """


@hookspec(firstresult=True)
def idlora_sync_indices(indices: dict[str, torch.Tensor], owners: dict[str, int],
                        adapter_name: str) -> Optional[dict[str, torch.Tensor]]:
    """Give every process every index table; return the tables (module name -> `[k, r]`) this rank must use.

    Called on every rank once per decomposition. `indices` holds the tables this rank computed, `owners` maps
    every module name to the rank that computed it (modules are dealt round-robin). The built-in plugin
    exchanges them with `torch.distributed` when it is initialised with more than one process (DDP,
    DeepSpeed), and returns `indices` unchanged otherwise.
    """


@hookspec
def idlora_report(model: nn.Module, adapter_name: str, config, timings: dict[str, float]) -> None:
    """Called after an adapter was injected and its indices filled (every plugin is called).

    `model` is the model holding the ID-LoRA layers; `timings` has `"decomposition_s"` (0 when nothing was
    clustered) and `"modules"` (how many modules were clustered). The built-in reporter logs the parameter
    table against LoRA through transformers' logger.
    """
