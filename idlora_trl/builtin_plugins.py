"""The built-in plugins: row-selection strategies, plain weight access, index sync, and the report.

Registered by `idlora_trl.plugins.get_plugin_manager()` exactly as third-party plugins are.
"""

from __future__ import annotations

import contextlib

import torch.distributed as dist
from transformers.utils import logging

from .counting import count_parameters, format_parameter_table
from .decomposition import SELECTIONS, select_rows
from .hookspecs import hookimpl

logger = logging.get_logger(f"transformers.{__name__}")  # under transformers: its verbosity applies


class RowSelection:
    """One strategy of `decomposition.select_rows`: the paper's PMRC, PMRC with pivoted rows, or an ablation
    baseline."""

    def __init__(self, selection: str) -> None:
        self.name = selection

    @hookimpl
    def idlora_selection_names(self):
        return [self.name]

    @hookimpl
    def idlora_select_rows(self, weight, module_name, config):
        if config.selection != self.name:
            return None
        return select_rows(weight, num_clusters=config.num_clusters, r=config.r, selection=self.name,
                           distance=config.distance, min_cluster_size=config.min_cluster_size, seed=config.seed)


class PlainWeight:
    """The weight is all here (no partitioning): nothing to do."""

    name = "plain-weight"

    @hookimpl(trylast=True)
    def idlora_weight_context(self, module, module_name):
        return contextlib.nullcontext()


class ExchangeOverTorchDistributed:
    """Plain `torch.distributed` (DDP, and DeepSpeed, which runs on it): every rank sends the tables it
    computed and receives all the others."""

    name = "exchange-indices"

    @hookimpl(trylast=True)
    def idlora_sync_indices(self, indices, owners, adapter_name):
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return indices
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {name: table.cpu() for name, table in indices.items()})
        synced = {}
        for name, owner in owners.items():
            if name not in gathered[owner]:
                raise RuntimeError(f"rank {owner} did not send the indices of module {name!r}")
            synced[name] = gathered[owner][name]
        return synced


class LogReport:
    """Logs the parameter table against LoRA after each injection."""

    name = "log-report"

    @hookimpl
    def idlora_report(self, model, adapter_name, config, timings):
        count = count_parameters(model, adapter_name)
        logger.info(
            f"ID-LoRA adapter {adapter_name!r}: clustered {timings['modules']} module(s) in "
            f"{timings['decomposition_s']:.2f} s.\n{format_parameter_table(count)}"
        )


PLUGINS = [*(RowSelection(name) for name in SELECTIONS), PlainWeight(), ExchangeOverTorchDistributed(), LogReport()]
