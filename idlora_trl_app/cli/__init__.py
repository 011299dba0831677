"""The `idlora-trl` command line.

- `idlora-trl sft` / `dpo`: ID-LoRA training with TRL, parsed as `trl sft` / `trl dpo` parse theirs (`trl.TrlParser`
  over TRL's `ScriptArguments`, `SFTConfig`/`DPOConfig`, `ModelConfig`, plus the ID-LoRA settings `--idlora_*`):
  every TRL option under TRL's name, and `--config FILE.yaml`. Without a model and a dataset, the main job: the
  embedded SmolLM2-135M-Instruct on built-in data, with the parameter table, the loss, held-out figures before and
  after, and a picture of the run.
- `idlora-trl decompose`: cluster a model once and write the index file that later runs reuse.
- `idlora-trl count`: the parameter table of ID-LoRA against LoRA and DoRA, on the meta device.
- `idlora-trl demo`: adapt the embedded model, print the table, save and reload without re-clustering.

Bad input ends with a one-line error and exit status 2, never a traceback. Modules: `common` (the error type, the
ID-LoRA config), `parser` (the TRL parsers), `runtime` (model, data, trainer set-up), `train` (`sft`, `dpo`),
`basic` (`decompose`, `count`, `demo`), `report` (the picture).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .common import UsageError

__all__ = ["COMMANDS", "UsageError", "main"]

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


def run(command: str, argv: list[str]) -> None:
    """Parse and run one subcommand; raises `UsageError` for bad input."""
    if command in ("sft", "dpo"):
        from .parser import parse_training
        from .train import cmd_dpo, cmd_sft

        parsed = parse_training(command, argv)
        (cmd_sft if command == "sft" else cmd_dpo)(parsed)
    else:
        from . import basic

        getattr(basic, f"cmd_{command}")(argv)


def quiet_deepspeed_on_cpu() -> None:
    """accelerate imports DeepSpeed wherever it is installed (`extract_model_from_parallel`, called by TRL's trainers),
    and DeepSpeed then warns "Setting accelerator to CPU" on a machine without GPUs, although no DeepSpeed is used.
    Naming the CPU accelerator, which DeepSpeed's own detection would pick there, keeps it quiet."""
    import importlib.util

    import torch

    others = ("intel_extension_for_pytorch", "torch_npu", "habana_frameworks", "torch_sdaa", "torch_mlu")
    if ("DS_ACCELERATOR" in os.environ or torch.cuda.is_available() or torch.backends.mps.is_available()
            or (hasattr(torch, "xpu") and torch.xpu.is_available())
            or any(importlib.util.find_spec(name) for name in others)):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # PEFT vs transformers
    # The Hub stays reachable, as for `trl sft`: a user's `--model_name_or_path org/name` or Hub `--dataset_name`
    # downloads. The main job needs no network (embedded model, built-in data); tests and CI set HF_HUB_OFFLINE.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1] or ["--help"])  # help, or a one-line error for an unknown command
    command = argv[0]
    quiet_deepspeed_on_cpu()
    try:
        run(command, argv[1:])
    except UsageError as error:
        print(f"idlora-trl {command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
