"""What every `idlora-trl` subcommand shares: the one-line error type and the ID-LoRA flags."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


def add_idlora_arguments(parser: argparse.ArgumentParser, r: int = 32) -> None:
    group = parser.add_argument_group("ID-LoRA")
    # --idlora-r: torchrun reads a bare --r as an abbreviation of its own --rdzv-*/--role options and stops.
    group.add_argument("--r", "--idlora-r", type=int, default=r, dest="r",
                       help="rank r: skeleton rows per cluster; under torchrun write --idlora-r (default %(default)s)")
    group.add_argument("--num-clusters", type=int, default=4, help="clusters k (default %(default)s)")
    group.add_argument("--rank-boost", type=int, default=2, help="rank-boost factor f (default %(default)s)")
    group.add_argument("--router", default="token", choices=["token", "static"])
    group.add_argument("--router-norm", default="none", choices=["none", "rms"],
                       help="token router scale: none (the paper's) or rms (scale-free; default %(default)s)")
    group.add_argument("--selection", default="pmrc",
                       help="row selection: pmrc (the paper's), pmrc-qr, random, sequential, or a plugin's "
                            "(default %(default)s)")
    group.add_argument("--target-modules", default="all-linear",
                       help="comma-separated module names, or all-linear (default)")
    group.add_argument("--lora-r", type=int, default=None, help="LoRA/DoRA rank to compare with (default r/4)")


def idlora_config(args: argparse.Namespace):
    from ..config import IDLoRAConfig

    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    try:
        return IDLoRAConfig(r=args.r, num_clusters=args.num_clusters, rank_boost=args.rank_boost,
                            router=args.router, router_norm=args.router_norm, selection=args.selection,
                            target_modules=targets,
                            task_type="CAUSAL_LM")
    except ValueError as error:
        raise UsageError(str(error)) from error
