"""Arguments of the training commands (`sft`, `dpo`, `decompose`): flags, `--config` files, defaults.

Every setting is a flag, or a key of a `--config file.yaml|json` named like the flag (`max-steps` or
`max_steps`); flags override the file. Bad values are one-line errors with exit status 2 (`UsageError`, or
argparse's own error reduced to one line).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any

from ..settings import DEFAULT_TARGETS, DPO_DEFAULTS, METHOD_FIELDS, SFT_DEFAULTS
from .common import (UsageError, add_idlora_arguments, idlora_config, non_negative_float, non_negative_int,
                     positive_float, positive_int, probability)

__all__ = ["DEFAULT_TARGETS", "DPO_DEFAULTS", "SFT_DEFAULTS", "add_model_and_idlora", "add_training",
           "build_idlora_config", "finish", "non_negative_float", "non_negative_int", "positive_float",
           "positive_int", "probability", "resolve"]


# ------------------------------------------------------------------------------------------ arguments
class Default:
    """A parser default that remembers it was not given on the command line (so a config file may set it)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return str(self.value)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" except where there is no value to show (None, or a switch that is off)."""

    def _get_help_string(self, action):
        default = action.default.value if isinstance(action.default, Default) else action.default
        if default is None or default is False or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)



def add_model_and_idlora(parser: argparse.ArgumentParser, r: int) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML or JSON file whose keys are these flags' names; flags override it")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="model directory (default: the embedded SmolLM2-135M-Instruct, converted once)")
    decompose = parser.prog.split()[-1] == "decompose"
    names = [name for name in METHOD_FIELDS if not (decompose and name == "indices_path")]
    add_idlora_arguments(parser, r=r, names=names, target_modules=DEFAULT_TARGETS)
    if not decompose:
        group = next(g for g in parser._action_groups if g.title == "ID-LoRA")
        group.add_argument("--no-index-cache", action="store_true", default=False,
                           help="with the embedded model, cluster again instead of reusing the indices cached by "
                                "an earlier run with the same settings")


def add_training(parser: argparse.ArgumentParser, defaults: dict) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--max-steps", type=positive_int, default=defaults["max_steps"], help="optimizer steps")
    group.add_argument("--learning-rate", type=positive_float, default=defaults["learning_rate"],
                       help="peak learning rate (measured: ID-LoRA's best is 4-8x below LoRA's, docs/BENCHMARKS.md)")
    group.add_argument("--batch-size", type=positive_int, default=defaults["batch_size"], help="rows per step")
    group.add_argument("--gradient-accumulation-steps", type=positive_int, default=1, help="micro-batches per step")
    group.add_argument("--lr-scheduler", default=defaults.get("lr_scheduler", "constant"),
                       choices=["constant", "linear", "cosine", "constant_with_warmup"], help="learning-rate schedule")
    group.add_argument("--warmup-steps", type=non_negative_int, default=defaults.get("warmup_steps", 0),
                       help="linear warm-up steps")
    group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    group.add_argument("--max-length", type=positive_int, default=defaults["max_length"], help="tokens per example")
    group.add_argument("--logging-steps", type=positive_int, default=defaults["logging_steps"],
                       help="print the loss every N steps")
    group.add_argument("--seed", type=non_negative_int, default=0, help="training and data-order seed")
    group.add_argument("--output-dir", default=defaults["output_dir"], help="where the adapter is saved")
    group.add_argument("--dataset", default=None, metavar="PATH_OR_NAME",
                       help="a .jsonl/.json file, a saved dataset directory, or a Hugging Face dataset name "
                            "(default: the built-in data)")
    group.add_argument("--dataset-config", default=None, help="configuration name of a Hugging Face dataset")
    group.add_argument("--dataset-split", default="train", help="split of a Hugging Face dataset")
    group.add_argument("--eval-dataset", default=None, metavar="PATH_OR_NAME",
                       help="held-out rows for the before/after evaluation (default: the built-in held-out split)")
    group.add_argument("--max-train-samples", type=positive_int, default=None, help="use only the first N rows")
    group.add_argument("--eval-samples", type=non_negative_int, default=defaults.get("eval_samples", 24),
                       help="held-out items per task (sft) or per kind of prompt (dpo); 0: no evaluation")
    group.add_argument("--eval-batch-size", type=positive_int, default=32, help="prompts per generation batch")
    group.add_argument("--bf16", action="store_true", default=False,
                       help="bf16 mixed precision (GPUs; on CPUs without AMX it is 50-75x slower than fp32)")
    group.add_argument("--deepspeed", default=None, metavar="JSON",
                       help="a DeepSpeed config (e.g. integrations/deepspeed/zero3_cpu_fp32.json): ZeRO-3 partitions "
                            "the model as it loads; launch with torchrun or deepspeed; generation-based evaluation "
                            "is skipped (the weights are partitioned)")
    # The `deepspeed` launcher passes --local_rank=N (torchrun sets LOCAL_RANK instead); accepted, not needed.
    group.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)


FLAGS_NOTE = "Flags may also come from --config FILE (keys named like the flags); flags override the file."


def finish(parser: argparse.ArgumentParser, func) -> None:
    parser.error = functools.partial(_one_line_error, parser.prog)  # not argparse's usage dump
    for action in parser._actions:  # remember which values the user did not give
        if action.dest not in ("help", "config") and action.default is not argparse.SUPPRESS:
            action.default = Default(action.default)
    parser.set_defaults(func=func, _parser=parser)


def _one_line_error(prog: str, message: str) -> None:
    print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
    raise SystemExit(2)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """The settings to use: command-line flags, else the `--config` file, else the defaults."""
    parser: argparse.ArgumentParser = args._parser
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    from_file = _read_config_file(args.config, actions) if args.config else {}
    out = argparse.Namespace()
    for dest in actions:
        value = getattr(args, dest)
        if isinstance(value, Default):
            value = from_file.get(dest, value.value)
        setattr(out, dest, value)
    out.command, out.config, out.func = args.command, args.config, args.func
    return out


def _read_config_file(path: str, actions: dict) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if path.endswith(".json"):
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read config file {path!r}: {error}") from error
    except Exception as error:  # json.JSONDecodeError, yaml.YAMLError
        raise UsageError(f"cannot parse config file {path!r}: {' '.join(str(error).split())}") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of flag names to values")
    out = {}
    for key, value in values.items():
        dest = str(key).lstrip("-").replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("func", "_parser"):
            known = ", ".join(sorted(d.replace("_", "-") for d in actions if not d.startswith("_") and d != "func"))
            raise UsageError(f"unknown key {key!r} in config file {path!r}; known keys: {known}")
        out[dest] = _convert(action, value, f"config file {path!r}: {key}")
    return out


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    if value is None:
        return None
    if action.nargs == 0:  # a switch such as --no-index-cache
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(value, (dict, list)):
        if action.dest == "target_modules" and isinstance(value, list):
            value = ",".join(map(str, value))
        else:
            raise UsageError(f"{where}: expected a single value, got {value!r}")
    if isinstance(value, bool) and action.type is not None:
        raise UsageError(f"{where}: expected {getattr(action.type, '__name__', 'a value')}, got {value!r}")
    converter = action.type or str
    try:
        value = converter(value) if converter is not str else str(value)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: invalid {getattr(converter, '__name__', 'value')} value {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{where}: invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")
    return value


def build_idlora_config(opts: argparse.Namespace):
    if getattr(opts, "indices_path", None) is not None and not os.path.isfile(opts.indices_path):
        raise UsageError(f"index file {opts.indices_path!r} does not exist; write one with `idlora-trl decompose`")
    return idlora_config(opts)
