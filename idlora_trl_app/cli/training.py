"""What `idlora-trl sft` and `idlora-trl dpo` share, written once: their parser and the run around TRL's trainer.

The parser (`training_parser`) is `trl.TrlParser` over TRL's own dataclasses (`ScriptArguments`, `SFTConfig` or
`DPOConfig`, `ModelConfig`, `DatasetMixtureConfig`), the ID-LoRA settings (`idlora_trl.settings.IDLoRAArguments`) and
the command's few options of its own (`JobArguments`); the command's defaults (`idlora_trl_app.defaults`, under the
options' own names) replace TRL's. The run (`TrainingRun`): the ID-LoRA config and the checkpoint to resume, checked
before anything loads; the model; the held-out evaluation by generation before training; the trainer (which injects
ID-LoRA); training, printed one line per logging step; the adapter saved; a summary, the evaluation after training
against before; the picture of the run. `sft.py` and `dpo.py` bring the data and what they measure.
"""

from __future__ import annotations

import copy
import importlib.util
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

from idlora_trl.settings import IDLoRAArguments

from .adapter_config import peft_config
from .arguments import LORA_ONLY, check_values, has_option, new_parser, set_help
from .checkpoints import resolve_checkpoint
from .distributed import cuda_available, end_distributed, start_deepspeed, uses_deepspeed
from .errors import UsageError
from .main_job import index_cache
from .model import count_base_parameters, load_model
from .picture import write_picture
from .printing import log_callback, say, seconds, use_our_printer
from .trainer import build_trainer, save_adapter

# What the command sets whatever the job: its own printer (first step included, no progress bar), and ModelConfig's
# LoRA options unset (None), so that one given is seen and refused (`--lora_r`: the table's LoRA rank, r/4 unset).
COMMAND_SETTINGS = dict(logging_first_step=True, disable_tqdm=True, lora_r=None, lora_alpha=None, lora_dropout=None)


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


class Arguments(NamedTuple):
    """A parsed `sft` / `dpo` command line, in the parser's order: the command runs `main(*arguments)`."""

    script: Any    # trl.ScriptArguments
    training: Any  # trl.SFTConfig / trl.DPOConfig
    model: Any     # trl.ModelConfig
    dataset: Any   # trl.DatasetMixtureConfig (`datasets:` in a --config file, as with `trl sft`)
    idlora: Any    # IDLoRAArguments
    job: Any       # SFTJobArguments / DPOJobArguments


def training_parser(command: str, config_class, job_class, defaults: dict, description: str, subparsers=None,
                    prog: Optional[str] = None):
    """The parser of `idlora-trl sft` / `dpo`, whose defaults are `defaults` (the options' own names)."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    parser = new_parser(command, (ScriptArguments, config_class, ModelConfig, DatasetMixtureConfig, IDLoRAArguments,
                                  job_class), description, prepare=before_training_config, subparsers=subparsers,
                        prog=prog)
    values = {**copy.deepcopy(defaults), **COMMAND_SETTINGS}
    if not cuda_available():  # TRL's defaults are for GPUs: bf16 is 50-75x slower than fp32 on most CPUs
        values.update(use_cpu=True, bf16=False)
    parser.set_defaults(**{name: value for name, value in values.items() if has_option(parser, name)})
    set_help(parser)
    # Gradient checkpointing: TRL's default (on) on GPUs, off on CPUs, where it only costs time (4.5 against 5.3 s a
    # step on SmolLM2). TRL's name for it is `gradient_checkpointing`, which newer transformers deprecate (a
    # FutureWarning whenever it is set, TRL's own default included): the parser accepts it without that warning.
    parser.set_defaults(gradient_checkpointing=cuda_available())
    return parser


def before_training_config(parser, namespace) -> None:
    """What must hold before `SFTConfig` / `DPOConfig` is built: the values checked, and with DeepSpeed the process
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


@dataclass
class Evaluation:
    """The held-out evaluation by generation, before and after training."""

    score: Callable[[Any], dict]  # model -> {task or kind: result with .accuracy}; {} when nothing is scored
    title: str                    # the line before training: "Held-out accuracy before training"
    metric: str                   # the picture's axis: "held-out accuracy"
    comparison: dict = field(default_factory=dict)  # `format_comparison`'s keyword arguments


class TrainingRun:
    """One `idlora-trl sft` / `dpo` run. Made before anything loads: the ID-LoRA config and the checkpoint to resume
    are checked first. `train` is the run from the evaluation before training to the picture."""

    def __init__(self, command: str, script_args, training_args, model_args, dataset_args, idlora_args, job_args):
        self.start = time.perf_counter()
        self.command, self.script, self.training, self.model_args = command, script_args, training_args, model_args
        self.dataset, self.job = dataset_args, job_args
        self.peft_config = peft_config(idlora_args, model_args)
        self.checkpoint = resolve_checkpoint(training_args)

    def needs_eval_rows(self, rows) -> None:
        if str(self.training.eval_strategy).split(".")[-1].lower() != "no" and not rows:
            raise UsageError("--eval_strategy needs held-out rows: --eval_samples > 0 (built-in data) or "
                             "--eval_dataset")

    def load_model(self, data: str):
        """`(model, tokenizer)`, and a line on the model and `data` (what the job trains and evaluates on)."""
        model, tokenizer, label = load_model(self.model_args.model_name_or_path, self.model_args)
        say(f"Model: {label} ({count_base_parameters(model):,} parameters); data: {data}; loaded in "
            f"{seconds(self.start)}")
        return model, tokenizer

    def generation_allowed(self, held_out):
        """Greedy generation needs whole weights, which ZeRO-3 has partitioned: say so and evaluate nothing."""
        if uses_deepspeed(self.training) and held_out:
            say(f"Held-out evaluation by generation skipped under DeepSpeed ZeRO-3 ({len(held_out)} items): load the "
                "saved adapter in one process to evaluate it")
            return type(held_out)()
        return held_out

    def train(self, trainer_class, evaluation: Evaluation, log_keys: tuple[str, ...], summarise, details: str = "",
              **trainer_kwargs):
        """Evaluate, build the trainer, train, save, summarise, evaluate again, draw. `summarise(trainer, result,
        seconds)` gives the summary's lines (run before the adapter is saved); `details`, more of the training line."""
        from ..evaluation import format_comparison, format_examples

        args, model = self.training, trainer_kwargs["model"]
        t0 = time.perf_counter()
        before = evaluation.score(model)
        if before:
            say(f"\n{evaluation.title} ({seconds(t0)}): "
                + ", ".join(f"{name} {result.accuracy:.3f}" for name, result in before.items()))

        cache = index_cache(self.model_args, self.job, self.peft_config)  # the embedded model's, else None
        trainer = build_trainer(trainer_class, self.peft_config, self.checkpoint, cache, self.model_args.lora_r,
                                args=args, **trainer_kwargs)
        use_our_printer(trainer, log_callback(args.max_steps, log_keys))
        length = f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"
        say(f"\nTraining {length}, batch {args.per_device_train_batch_size}, lr {args.learning_rate:g}{details}"
            + (f", resuming from {self.checkpoint}" if self.checkpoint else "") + ":")
        t0 = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=self.checkpoint)
        summary = summarise(trainer, result, time.perf_counter() - t0)

        save_adapter(trainer, args.output_dir)

        say("\n== Summary ==")
        for line in summary:
            say(line)
        after = {}
        if before:
            after = evaluation.score(trainer.model)
            say(format_comparison(before, after, **evaluation.comparison))
            say(format_examples(after, "Sample held-out replies after training:"))
        if args.push_to_hub:  # as `trl sft` does
            trainer.push_to_hub(dataset_name=self.script.dataset_name)
        if self.job.plot and trainer.is_world_process_zero():
            path = write_picture(self.command, args.output_dir, trainer.state.log_history, evaluation.metric, before,
                                 after)
            if path:
                say(f"picture of the run: {path}")
        say(f"total wall time {seconds(self.start)}")
        end_distributed()
        return trainer
