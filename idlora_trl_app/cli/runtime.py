"""What the training commands share: loading the model and data, building the trainer, printing progress."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Optional

from transformers.utils import logging

from .common import UsageError, first_line

logger = logging.get_logger(f"transformers.{__name__}")

# ------------------------------------------------------------------------------------- model and data
def quantization(model_args, dtype) -> dict:
    """`from_pretrained` arguments for TRL's `--load_in_4bit` / `--load_in_8bit` (bitsandbytes, QLoRA-style: the
    rows of the dequantized weights are clustered; integrations/bitsandbytes)."""
    import torch

    four, eight = getattr(model_args, "load_in_4bit", False), getattr(model_args, "load_in_8bit", False)
    if not (four or eight):
        return {}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise UsageError(f"--load_in_{'4' if four else '8'}bit needs bitsandbytes: pip install bitsandbytes") from error
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=True) if eight else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=torch.float32 if dtype == "auto" else dtype)
    device = int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": {"": device}}


def load_model(path: Optional[str], model_args=None):
    """`(model, tokenizer, label)`: a local model directory (or a cached Hub name), or the embedded SmolLM2.
    `model_args` (a `trl.ModelConfig`) gives the dtype, revision and attention implementation."""
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
            raise UsageError(f"--model_name_or_path {path!r} is not a model directory (no config.json)")
        if os.path.isfile(path):
            raise UsageError(f"--model_name_or_path {path!r} is a file; pass the model directory")
        if not os.path.exists(path) and (path.startswith((".", "/", "~")) or path.count("/") != 1):
            raise UsageError(f"--model_name_or_path {path!r} does not exist")
    dtype = getattr(model_args, "dtype", None) or "float32"
    kwargs = dict(dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    if getattr(model_args, "attn_implementation", None):
        kwargs["attn_implementation"] = model_args.attn_implementation
    if getattr(model_args, "model_revision", "main") not in (None, "main"):
        kwargs["revision"] = model_args.model_revision
    kwargs.update(quantization(model_args, kwargs["dtype"]))
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise for a model that loads in a second
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **{k: v for k, v in kwargs.items() if k == "revision"})
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"cannot load model {path!r} (--model_name_or_path takes a model directory, or a Hub name "
                         f"this machine can download): {first_line(error)}") from error
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"the tokenizer of {path!r} has no chat template; the built-in and conversational "
                         "datasets need one")
    return model, tokenizer, label


def user_dataset(source: str, kind: str, script, option: str = "--dataset_name", split: Optional[str] = None):
    """A user's dataset (`trl.ScriptArguments` gives the split and configuration); problems are `UsageError`s."""
    from ..data import DataError, load_dataset

    try:
        return load_dataset(source, kind, split=split or script.dataset_train_split,
                            config_name=script.dataset_config)
    except DataError as error:
        raise UsageError(f"{option}: {error}") from error


def mixture_dataset(mixture, kind: str, script):
    """TRL's dataset mixture (`datasets:` in a --config file), loaded by `trl.get_dataset` as `trl sft` loads it:
    `(train, test)`, the `--dataset_train_split` and, when `test_split_size` made one, the `--dataset_test_split`
    (else None). Problems are `UsageError`s."""
    from trl import get_dataset

    from ..data import DataError, check_columns, no_progress_bars

    try:
        with no_progress_bars():
            splits = get_dataset(mixture)
    except Exception as error:  # datasets' own errors: a missing file, an unknown builder, mismatched columns
        raise UsageError(f"datasets (the --config file's mixture): cannot load it: {first_line(error)}") from error
    if script.dataset_train_split not in splits:
        raise UsageError(f"datasets: the mixture has splits {sorted(splits)}, not --dataset_train_split "
                         f"{script.dataset_train_split!r}")
    train = splits[script.dataset_train_split]
    try:
        check_columns(train.column_names, kind, "datasets")
    except DataError as error:
        raise UsageError(f"datasets: {error}") from error
    return train, splits.get(script.dataset_test_split)


def training_columns(dataset, columns: tuple[str, ...]):
    """Keep only the columns TRL trains on (built-in bookkeeping columns such as `task` are dropped)."""
    return dataset.remove_columns([c for c in dataset.column_names if c not in columns])


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
            if not state.is_world_process_zero or not logs:
                return
            if "eval_loss" in logs:  # --eval_strategy: the loss on the held-out rows
                print(f"  step {state.global_step:>4}/{total_steps}  eval loss {logs['eval_loss']:.4f}", flush=True)
            if "loss" not in logs:
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


def _index_cache(run, peft_config) -> Optional[str]:
    """Where the embedded model's indices for these settings are cached (`None`: no caching).

    Clustering the default target modules of SmolLM2 takes about 15 s on 2 cores; the indices depend only on the
    frozen weights and the decomposition settings, so later runs with the same settings reuse them (the
    project's "cluster once" file, written for you). Never used for other models, with --idlora_indices_path, or in a
    distributed run (ranks that disagree on whether a cached file exists would not cluster alike)."""
    if (run.model.model_name_or_path is not None or peft_config.indices_path is not None or not run.job.index_cache
            or is_distributed()):
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


def setup_adapter(cls, run, peft_config, checkpoint: Optional[str] = None, **kwargs):
    """Build the trainer (which injects ID-LoRA): the indices come from the checkpoint being resumed, an index file,
    the embedded model's index cache (filled on the first run), or clustering."""
    given = peft_config.indices_path
    if checkpoint is not None:
        peft_config.indices_path = checkpoint  # its adapter holds the tables: resuming never clusters again
    cache = _index_cache(run, peft_config)
    reuse = cache is not None and os.path.isfile(cache)
    if reuse:
        peft_config.indices_path = cache
    start = time.perf_counter()
    trainer = _make_trainer(cls, peft_config=peft_config, **kwargs)
    elapsed = seconds(start)
    if checkpoint is not None:
        how = f"clustering skipped: indices from the checkpoint {checkpoint}"
    elif given:
        how = f"clustering skipped: indices from {given}"
    elif reuse:
        how = f"clustering skipped: indices cached by an earlier run, {cache} (--no_index_cache to redo it)"
    else:
        how = "clustering included"
        if cache is not None:
            from idlora_trl import get_indices, save_indices

            staging = f"{cache}.{os.getpid()}.tmp"
            save_indices(staging, get_indices(trainer.model), peft_config.decomposition_spec())
            os.replace(staging, cache)  # atomic: concurrent runs never read half a file
            how += f"; indices cached in {cache} for later runs"
    say(f"ID-LoRA set up in {elapsed} ({how})")
    if run.model.lora_r:  # the trainer's table compares with LoRA at r/4; the user asked for another rank
        from idlora_trl import count_parameters, format_parameter_table

        say(f"Against LoRA at r={run.model.lora_r}:\n"
            f"{format_parameter_table(count_parameters(trainer.model, lora_r=run.model.lora_r))}")
    return trainer


def _make_trainer(cls, **kwargs):
    """Build the trainer (this injects ID-LoRA); settings that do not fit the model are one-line errors."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:  # e.g. num_clusters * r > d_out, no module matched, index file
        raise UsageError(first_line(error)) from error


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

