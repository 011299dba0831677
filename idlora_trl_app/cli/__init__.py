"""The `idlora-trl` command line.

- `idlora-trl sft` / `dpo`: ID-LoRA training with TRL, parsed as `trl sft` / `trl dpo` parse theirs (`trl.TrlParser`
  over TRL's `ScriptArguments`, `SFTConfig`/`DPOConfig`, `ModelConfig`, plus the ID-LoRA settings `--idlora_*`):
  every TRL option under TRL's name, and `--config FILE.yaml`. Without a model and a dataset, the main job: the
  embedded SmolLM2-135M-Instruct on built-in data, with the parameter table, the loss, held-out figures before and
  after, and a picture of the run.
- `idlora-trl decompose`: cluster a model once and write the index file that later runs reuse.
- `idlora-trl count`: the parameter table of ID-LoRA against LoRA and DoRA, on the meta device.
- `idlora-trl demo`: adapt the embedded model, print the table, save and reload without re-clustering.

Bad input ends with a one-line error and exit status 2, never a traceback.

Each command is a module in the shape of TRL's `trl/scripts/sft.py`: a usage docstring, `make_parser(subparsers=None)`
and `main(...)`, which takes the parsed dataclasses: `sft`, `dpo`, `decompose`, `count`, `demo`. What they use:
- `training`: the parser of `sft` / `dpo` and the run around TRL's trainer, written once (evaluate before, build
  the trainer, train, save, summarise, evaluate after, draw); `main_job`: the embedded SmolLM2 and the built-in data,
  used where no model or no dataset is given; `training_data`: the user's datasets; `model`: loading the model;
  `trainer`: building the ID-LoRA trainer (indices from a checkpoint, an index file, the index cache, or clustering)
  and saving the adapter; `checkpoints`: `--resume_from_checkpoint`; `printing`: what rank 0 prints; `picture`:
  `run.png`; `distributed`: ranks, DeepSpeed's start-up, the process group;
- `arguments`: the `trl.TrlParser` of every command, its help texts and checks, `--config` files; `adapter_config`:
  the `IDLoRAConfig` of the `--idlora_*` options; `errors`: the one-line error.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .errors import UsageError

__all__ = ["COMMANDS", "UsageError", "main", "parse"]

COMMANDS = {
    "sft": "ID-LoRA SFT with TRL (default: SmolLM2-135M on the built-in multi-task mix)",
    "dpo": "ID-LoRA DPO with TRL (default: SmolLM2-135M on the built-in safety set)",
    "decompose": "cluster a model once and write its ID-LoRA index file",
    "count": "parameter table of ID-LoRA against LoRA and DoRA, on the meta device",
    "demo": "adapt SmolLM2-135M with ID-LoRA, print the table, save and reload",
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idlora-trl", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, text in COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)

    def error(message: str) -> None:
        print(f"idlora-trl: error: {message} (see idlora-trl --help)", file=sys.stderr)
        raise SystemExit(2)

    parser.error = error
    return parser


def command_module(command: str):
    """The module of `idlora-trl COMMAND`: its `make_parser()` and `main(...)`."""
    from . import count, decompose, demo, dpo, sft

    return {"sft": sft, "dpo": dpo, "decompose": decompose, "count": count, "demo": demo}[command]


def parse(command: str, argv: list[str]) -> tuple:
    """The parsed dataclasses of `idlora-trl COMMAND ARGV` (flags, `--config FILE`), the arguments of the command's
    `main`; for `sft` / `dpo` a `training.Arguments` (`.script`, `.training`, ...). Raises `UsageError`."""
    from .arguments import parse_with

    parsed = parse_with(command_module(command).make_parser(), argv)
    if command in ("sft", "dpo"):
        from .training import Arguments

        return Arguments(*parsed)
    return parsed


def run(command: str, argv: list[str]) -> None:
    """Parse and run one subcommand; raises `UsageError` for bad input."""
    command_module(command).main(*parse(command, argv))


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # PEFT vs transformers
    # The Hub stays reachable, as for `trl sft`: a user's `--model_name_or_path org/name` or Hub `--dataset_name`
    # downloads. The main job needs no network (embedded model, built-in data); tests and CI set HF_HUB_OFFLINE.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1] or ["--help"])  # help, or a one-line error for an unknown command
    command = argv[0]
    from .distributed import quiet_deepspeed_on_cpu

    quiet_deepspeed_on_cpu()
    try:
        run(command, argv[1:])
    except UsageError as error:
        print(f"idlora-trl {command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
