"""The `idlora-trl` command line.

- `idlora-trl sft` / `dpo`: ID-LoRA training with TRL; by default on the embedded SmolLM2-135M-Instruct and
  built-in data (the main job), with the parameter table, the loss and held-out figures before and after.
- `idlora-trl decompose`: cluster a model once and write the index file that later runs reuse.
- `idlora-trl count`: the parameter table of ID-LoRA against LoRA and DoRA, on the meta device.
- `idlora-trl demo`: adapt the embedded model, print the table, save and reload without re-clustering.

Bad input ends with a one-line error and exit status 2, never a traceback. Modules: `common` (the error type,
the ID-LoRA flags), `args` (training flags and `--config` files), `runtime` (model, data, trainer set-up),
`train` (`sft`, `dpo`, `decompose`), `basic` (`demo`, `count`).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from . import basic, train
from .common import UsageError

__all__ = ["UsageError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idlora-trl", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train.register(commands)
    basic.register(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # PEFT vs transformers
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UsageError as error:
        print(f"idlora-trl {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
