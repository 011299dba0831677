"""ID-LoRA's settings, described once: `IDLoRAArguments`, a dataclass derived from `IDLoRAConfig`'s fields (type,
default, help, choices), is what `idlora-trl sft` / `dpo` parse with `trl.TrlParser` (as `--idlora_r`,
`--idlora_num_clusters`, ...) and what the Axolotl plugin's `idlora:` block is built from (`method_settings`, read
from the same dataclass); `make_config` turns settings into an `IDLoRAConfig` in one place. (The main job's
defaults are the app's: `idlora_trl_app.defaults`.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union, get_args, get_origin, get_type_hints

from .config import IDLoRAConfig

__all__ = ["IDLoRAArguments", "METHOD_FIELDS", "Setting", "flag_name", "make_config", "method_settings", "setting"]

# The fields of IDLoRAConfig that are ID-LoRA's own; the others (target_modules, modules_to_save, ...) are PEFT's
# and come from each front end's usual options.
METHOD_FIELDS = ("r", "num_clusters", "rank_boost", "idlora_alpha", "idlora_dropout", "router", "router_norm",
                 "selection", "distance", "min_cluster_size", "seed", "init_router_std", "indices_path", "preset")


def flag_name(name: str) -> str:
    """The command-line name of the setting `name`: `idlora_` plus the field's name (`r` -> `idlora_r`), so that no
    TRL option (`--seed`) and no launcher option (torchrun took a bare `--r` for its own `--rdzv_*`) is shadowed."""
    return name if name.startswith("idlora_") else f"idlora_{name}"


def _arguments_class() -> type:
    hints = get_type_hints(IDLoRAConfig)
    fields = {f.name: f for f in dataclasses.fields(IDLoRAConfig)}
    specs = []
    for name in METHOD_FIELDS:
        field = fields[name]
        default = None if field.default is dataclasses.MISSING else field.default
        specs.append((flag_name(name), hints[name],
                      dataclasses.field(default=default, metadata={"help": field.metadata.get("help", "")})))
    return dataclasses.make_dataclass("IDLoRAArguments", specs, namespace={
        "__doc__": "The ID-LoRA settings as `trl.TrlParser` arguments: one field per `IDLoRAConfig` field of "
                   "`METHOD_FIELDS`, named `flag_name(field)`, with the config's type, default and help.",
        "__module__": __name__,
        "values": lambda self: {name: getattr(self, flag_name(name)) for name in METHOD_FIELDS},
    })


# (argparse receives a field's metadata as keyword arguments: it holds the help text only)
IDLoRAArguments = _arguments_class()
_SETTING_OF_FLAG = {flag_name(name): name for name in METHOD_FIELDS}


@dataclass(frozen=True)
class Setting:
    """One `IDLoRAConfig` field as a front end needs it."""

    name: str                               # the field
    flag: str                               # its `IDLoRAArguments` field (the command line's `--idlora_...`)
    type: type                              # int, float or str (a choice is a str)
    default: Any                            # the field's default (None: derived, see the config's docs)
    help: str                               # the field's help text
    choices: Optional[tuple[str, ...]]      # a Literal field's values
    optional: bool                          # None is accepted (and means "the default rule")
    annotation: Any                         # the field's type, for schema builders (pydantic)


def _describe(field: dataclasses.Field, annotation: Any) -> Setting:
    name = _SETTING_OF_FLAG[field.name]
    optional = get_origin(annotation) is Union and type(None) in get_args(annotation)
    inner = next(a for a in get_args(annotation) if a is not type(None)) if optional else annotation
    choices = get_args(inner) if get_origin(inner) is Literal else None
    kind = str if choices else inner
    if kind not in (int, float, str):
        raise TypeError(f"IDLoRAConfig.{name}: a {annotation!r} field cannot be a command-line or Axolotl setting")
    return Setting(name=name, flag=field.name, type=kind, default=field.default, help=field.metadata["help"],
                   choices=choices, optional=optional, annotation=annotation)


def method_settings() -> list[Setting]:
    """Every ID-LoRA setting, in `METHOD_FIELDS` order, read from `IDLoRAArguments` (so from the config)."""
    hints = get_type_hints(IDLoRAArguments)
    return [_describe(field, hints[field.name]) for field in dataclasses.fields(IDLoRAArguments)]


def setting(name: str) -> Setting:
    return next(s for s in method_settings() if s.name == name)


def make_config(values: Mapping[str, Any], **peft_kwargs: Any) -> IDLoRAConfig:
    """The one place ID-LoRA settings become an `IDLoRAConfig`: `values` maps field names of `METHOD_FIELDS` to
    values (None, or absent: the field's default); `peft_kwargs` are PEFT's own fields (`target_modules`,
    `task_type`, ...). Raises `ValueError` (the config's own checks) for a bad value."""
    unknown = sorted(set(values) - set(METHOD_FIELDS))
    if unknown:
        raise ValueError(f"unknown ID-LoRA setting(s) {unknown}; known: {list(METHOD_FIELDS)}")
    kwargs = {name: value for name, value in values.items() if value is not None}
    return IDLoRAConfig(**kwargs, **{k: v for k, v in peft_kwargs.items() if v is not None})
