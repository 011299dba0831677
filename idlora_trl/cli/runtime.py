"""What the training commands share: loading the model and data, building the trainer, printing progress."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Optional

from transformers.utils import logging

from .common import UsageError

logger = logging.get_logger(f"transformers.{__name__}")

# ------------------------------------------------------------------------------------- model and data
def load_model(path: Optional[str]):
    """`(model, tokenizer, label)`: a local model directory (or a cached Hub name), or the embedded SmolLM2."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        from ..smollm2 import MODEL_NAME, smollm2_path

        try:
            path, label = smollm2_path(), MODEL_NAME
        except RuntimeError as error:
            raise UsageError(str(error)) from error
    else:
        path = os.path.expanduser(path)
        label = os.path.basename(os.path.normpath(path)) or path
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"model path {path!r} is not a model directory (no config.json)")
        if os.path.isfile(path):
            raise UsageError(f"model path {path!r} is a file; pass the model directory")
        if not os.path.exists(path) and (path.startswith((".", "/", "~")) or path.count("/") != 1):
            raise UsageError(f"model path {path!r} does not exist")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise for a model that loads in a second
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot load model {path!r} (nothing is downloaded; pass a local model directory): "
                         f"{first}") from error
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"the tokenizer of {path!r} has no chat template; the built-in and conversational "
                         "datasets need one")
    return model, tokenizer, label


def user_dataset(source: str, kind: str, opts, split: Optional[str] = None):
    from ..data import DataError, load_dataset

    try:
        return load_dataset(source, kind, split=split or opts.dataset_split, config_name=opts.dataset_config)
    except DataError as error:
        raise UsageError(str(error)) from error


def training_columns(dataset, columns: tuple[str, ...]):
    """Keep only the columns TRL trains on (built-in bookkeeping columns such as `task` are dropped)."""
    return dataset.remove_columns([c for c in dataset.column_names if c not in columns])


def make_training_args(config_cls, opts, **extra):
    """The trainer's arguments (`SFTConfig` or `DPOConfig`), built before the model is loaded.

    With `--deepspeed`, creating them switches on `zero.Init`, so that `from_pretrained` partitions the model
    while it loads (ZeRO-3) and the decomposition then gathers one weight at a time. On a machine without
    CUDA the process group is initialised first, over gloo (DeepSpeed would try NCCL)."""
    import torch

    cuda = torch.cuda.is_available()
    if opts.deepspeed:
        if not os.path.isfile(opts.deepspeed):
            raise UsageError(f"DeepSpeed config {opts.deepspeed!r} does not exist (this repository ships "
                             "integrations/deepspeed/zero3_cpu_fp32.json and zero3_bf16.json)")
        if not cuda:
            import deepspeed

            if "RANK" not in os.environ:  # one process without a launcher: a world of one
                for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
                    os.environ.setdefault(key, value)
            deepspeed.init_distributed(dist_backend="gloo")
    if opts.bf16 and not cuda:
        logger.warning("--bf16 on a CPU: expect training to be far slower than in fp32")
    kwargs = dict(output_dir=opts.output_dir, max_steps=opts.max_steps, per_device_train_batch_size=opts.batch_size,
                  per_device_eval_batch_size=opts.batch_size,
                  gradient_accumulation_steps=opts.gradient_accumulation_steps,
                  learning_rate=opts.learning_rate, lr_scheduler_type=opts.lr_scheduler,
                  warmup_steps=opts.warmup_steps, weight_decay=opts.weight_decay, logging_steps=opts.logging_steps,
                  logging_first_step=True, max_length=opts.max_length, seed=opts.seed, data_seed=opts.seed,
                  use_cpu=not cuda, bf16=opts.bf16, fp16=False, gradient_checkpointing=False, report_to="none",
                  save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, deepspeed=opts.deepspeed)
    try:
        return config_cls(**kwargs, **extra)
    except ValueError as error:  # e.g. a DeepSpeed config whose values contradict the flags
        raise UsageError(first_line(error)) from error


# ------------------------------------------------------------------------------------- distributed
def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun, deepspeed), or a single process: the one that prints."""
    return int(os.environ.get("RANK", "0")) == 0


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def say(*parts, **kwargs) -> None:
    """`print` on the main process only (every rank of a distributed run executes the same commands)."""
    if is_main_process():
        print(*parts, flush=True, **kwargs)


def end_distributed() -> None:
    """Leave the process group cleanly (left alive, gloo's threads can abort a rank at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def count_base_parameters(model) -> int:
    """Parameters of a model, partitioned (ZeRO-3: `ds_numel`) or not."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


# ----------------------------------------------------------------------------------------- logging
def log_callback(total_steps: int, keys: tuple[str, ...]):
    from transformers import TrainerCallback

    class PrintLogs(TrainerCallback):
        """One line per logging step: the step, the loss and a few metrics, the elapsed time."""

        def __init__(self) -> None:
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            parts = [f"step {state.global_step:>4}/{total_steps}", f"loss {logs['loss']:.4f}"]
            parts += [f"{key.split('/')[-1] if '/' in key else key} {logs[key]:.3f}" for key in keys if key in logs]
            parts.append(f"lr {logs.get('learning_rate', 0):.1e}")
            print("  " + "  ".join(parts) + f"  ({time.perf_counter() - self.start:.0f} s)", flush=True)

    return PrintLogs()


def use_our_printer(trainer, callback) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(callback)


def _index_cache(opts, peft_config) -> Optional[str]:
    """Where the embedded model's indices for these settings are cached (`None`: no caching).

    Clustering the default target modules of SmolLM2 takes about 15 s on 2 cores; the indices depend only on the
    frozen weights and the decomposition settings, so later runs with the same settings reuse them (the
    project's "cluster once" file, written for you). Never used for other models, with --indices-path, or in a
    distributed run (ranks that disagree on whether a cached file exists would not cluster alike)."""
    if opts.model is not None or opts.indices_path is not None or opts.no_index_cache or is_distributed():
        return None
    from ..smollm2 import MODEL_NAME, cache_dir, smollm2_path

    targets = peft_config.target_modules
    key = {"spec": peft_config.decomposition_spec(),
           "targets": targets if isinstance(targets, str) else sorted(targets),
           "exclude": sorted(peft_config.exclude_modules or []) if not isinstance(peft_config.exclude_modules, str)
           else peft_config.exclude_modules,
           "layers": peft_config.layers_to_transform}
    with open(os.path.join(smollm2_path(), "config.json"), encoding="utf-8") as handle:
        fingerprint = json.dumps(key, sort_keys=True, default=str) + handle.read()
    digest = hashlib.sha1(fingerprint.encode()).hexdigest()[:12]
    return str(cache_dir() / "indices" / f"{MODEL_NAME}-r{peft_config.r}-{digest}.safetensors")


def setup_adapter(cls, opts, peft_config, **kwargs):
    """Build the trainer (which injects ID-LoRA), reusing or filling the embedded model's index cache."""
    cache = _index_cache(opts, peft_config)
    reuse = cache is not None and os.path.isfile(cache)
    if reuse:
        peft_config.indices_path = cache
    start = time.perf_counter()
    trainer = _make_trainer(cls, peft_config=peft_config, **kwargs)
    elapsed = seconds(start)
    if opts.indices_path:
        how = f"clustering skipped: indices from {opts.indices_path}"
    elif reuse:
        how = f"clustering skipped: indices cached by an earlier run, {cache} (--no-index-cache to redo it)"
    else:
        how = "clustering included"
        if cache is not None:
            from .. import get_indices, save_indices

            staging = f"{cache}.{os.getpid()}.tmp"
            save_indices(staging, get_indices(trainer.model), peft_config.decomposition_spec())
            os.replace(staging, cache)  # atomic: concurrent runs never read half a file
            how += f"; indices cached in {cache} for later runs"
    say(f"ID-LoRA set up in {elapsed} ({how})")
    if getattr(opts, "lora_r", None):  # the trainer's table compares with LoRA at r/4; the user asked for another rank
        from .. import count_parameters, format_parameter_table

        say(f"Against LoRA at r={opts.lora_r}:\n"
            f"{format_parameter_table(count_parameters(trainer.model, lora_r=opts.lora_r))}")
    return trainer


def _make_trainer(cls, **kwargs):
    """Build the trainer (this injects ID-LoRA); settings that do not fit the model are one-line errors."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:  # e.g. num_clusters * r > d_out, no module matched, index file
        raise UsageError(first_line(error)) from error


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def save_adapter(trainer, output_dir: str) -> None:
    """Save the adapter (and tokenizer). The indices travel inside the adapter's weights, so the saved config
    does not point at an index file that may be absent where the adapter is loaded."""
    for config in trainer.model.peft_config.values():
        if getattr(config, "indices_path", None):
            config.indices_path = None
    trainer.save_model(output_dir)
    say(f"\nSaved the ID-LoRA adapter to {os.path.abspath(output_dir)}")


def loss_trend(trainer) -> str:
    """'1.4774 (step 1) -> 0.4123 (steps 26-30)': each logged loss is the mean since the previous log."""
    logs = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log and "step" in log]
    if not logs:
        return "not logged"
    (s0, l0), (s1, l1) = logs[0], logs[-1]
    previous = logs[-2][0] if len(logs) > 1 else 0
    window = f"step {s1}" if s1 - previous <= 1 else f"steps {previous + 1}-{s1}"
    return f"{l0:.4f} (step {s0}) -> {l1:.4f} ({window})"


def seconds(start: float) -> str:
    return f"{time.perf_counter() - start:.1f} s"

