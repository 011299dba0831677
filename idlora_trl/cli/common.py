"""What every `idlora-trl` subcommand shares: the one-line error type, checked argparse types, and the ID-LoRA
flags, derived from `IDLoRAConfig`'s fields (`idlora_trl.settings`: defaults, help and choices are the config's)."""

from __future__ import annotations

import argparse
from typing import Iterable

from ..decomposition import SELECTIONS
from ..plugins import check_selection
from ..settings import METHOD_FIELDS, Setting, make_config, method_settings


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


def _checked(convert, accept, name: str):
    """An argparse `type` that converts, then rejects values outside a range; `name` appears in errors."""

    def parse(text):
        value = convert(text)
        if not accept(value):
            raise ValueError(text)
        return value

    parse.__name__ = name  # argparse names the type in its error message
    return parse


positive_int = _checked(int, lambda v: v >= 1, "positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "non-negative integer")
positive_float = _checked(float, lambda v: v > 0, "positive number")
non_negative_float = _checked(float, lambda v: v >= 0, "non-negative number")
probability = _checked(float, lambda v: 0.0 <= v < 1.0, "probability in [0, 1)")

# How a setting is spelt and parsed on the command line, where the field name and type are not enough.
# --idlora-r: torchrun reads a bare --r as an abbreviation of its own --rdzv-*/--role options and stops.
# --cluster-seed: --seed is the training seed.
FLAGS = {"r": ("--r", "--idlora-r"), "seed": ("--cluster-seed",)}
PARSERS = {"r": positive_int, "num_clusters": positive_int, "rank_boost": positive_int,
           "min_cluster_size": positive_int, "seed": non_negative_int, "idlora_alpha": positive_float,
           "idlora_dropout": probability, "init_router_std": positive_float, "indices_path": str}
NOTES = {"r": "; under torchrun write --idlora-r", "indices_path": " (from `idlora-trl decompose`)"}
COUNT_SETTINGS = ("r", "num_clusters", "rank_boost", "router", "router_norm", "selection")


def dest(name: str) -> str:
    """The argparse destination of the setting `name`."""
    return FLAGS.get(name, (f"--{name}",))[0].lstrip("-").replace("-", "_")


def _help(item: Setting) -> str:
    text = item.help.rstrip(".") + NOTES.get(item.name, "")
    return text + (" (default %(default)s)" if item.default is not None else "")


def add_idlora_arguments(parser: argparse.ArgumentParser, r: int = 32, names: Iterable[str] = COUNT_SETTINGS,
                         target_modules: str = "all-linear") -> None:
    """The ID-LoRA flags for the settings `names`, in an "ID-LoRA" argument group."""
    group = parser.add_argument_group("ID-LoRA")
    for item in method_settings():
        if item.name not in names:
            continue
        flags = FLAGS.get(item.name, (f"--{item.name.replace('_', '-')}",))
        default = r if item.name == "r" else item.default
        metavar = "FILE" if item.name == "indices_path" else None
        group.add_argument(*flags, dest=dest(item.name), type=PARSERS.get(item.name, item.type), default=default,
                           choices=item.choices, metavar=metavar, help=_help(item))
    group.add_argument("--target-modules", default=target_modules,
                       help="comma-separated module names, or all-linear (default %(default)s)")
    group.add_argument("--lora-r", type=int, default=None, help="LoRA/DoRA rank to compare with (default r/4)")


def target_list(text: str):
    return text if text == "all-linear" else [t.strip() for t in text.split(",") if t.strip()]


def idlora_config(args: argparse.Namespace):
    """The `IDLoRAConfig` of the ID-LoRA flags present in `args` (the others keep the config's defaults)."""
    values = {name: getattr(args, dest(name)) for name in METHOD_FIELDS if hasattr(args, dest(name))}
    try:
        config = make_config(values, target_modules=target_list(args.target_modules), task_type="CAUSAL_LM")
        if config.selection not in SELECTIONS:  # a plugin's strategy: checked now, not after the model loaded
            check_selection(config.selection)
        return config
    except ValueError as error:
        raise UsageError(str(error)) from error
