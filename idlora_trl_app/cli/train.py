"""The training commands of `idlora-trl`: `sft` and `dpo`, parsed like `trl sft` / `trl dpo` (`parser.py`).

- `idlora-trl sft`: ID-LoRA SFT with `IDLoRASFTTrainer`. Defaults: the embedded SmolLM2-135M-Instruct and the
  built-in multi-task mix (arithmetic, sentiment, instructions); prints the parameter table against LoRA, the
  loss every few steps and held-out exact-match accuracy per task before and after; saves the adapter and a
  picture of the run (`run.png`).
- `idlora-trl dpo`: ID-LoRA DPO with `IDLoRADPOTrainer` (reference: the base with the adapter disabled).
  Defaults: the embedded model and the built-in safety set; prints reward accuracies and margins (training
  and held-out pairs), and the refusal rate on held-out harmful and benign prompts before and after.

`--save_steps N` writes checkpoints holding the adapter with its index tables; `--resume_from_checkpoint DIR`
continues from one without clustering again. Bad input is a one-line error with exit status 2.
"""

from __future__ import annotations

import time
from typing import Optional

from .checkpoints import resolve_checkpoint
from .common import UsageError, idlora_config
from .parser import Run, uses_deepspeed
from .report import write_picture
from .runtime import (count_base_parameters, end_distributed, load_model, log_callback, loss_trend,
                      mixture_dataset, save_adapter, say, seconds, setup_adapter,
                      training_columns, use_our_printer, user_dataset)


def _peft_config(run: Run):
    config = idlora_config(run.idlora, run.model.lora_target_modules, run.model.lora_modules_to_save)
    path = config.indices_path
    if path is not None:
        import os

        if not os.path.exists(path):
            raise UsageError(f"--idlora_indices_path {path!r} does not exist; write one with `idlora-trl decompose`")
    return config


def _user_data(run: Run) -> Optional[str]:
    """What the user gave for training data (--dataset_name or a `datasets:` mixture), None for the built-in data."""
    if run.mixture.datasets:
        return f"mixture of {len(run.mixture.datasets)} dataset(s) " + ", ".join(d.path for d in run.mixture.datasets)
    return run.script.dataset_name


def _user_rows(run: Run, kind: str):
    """`(train, test)`: the user's training rows, and the held-out rows of a mixture's `test_split_size` (used when
    no --eval_dataset is given, as `trl sft` does; else None)."""
    if run.mixture.datasets:
        train, test = mixture_dataset(run.mixture, kind, run.script)
    else:
        train, test = user_dataset(run.script.dataset_name, kind, run.script), None
    if run.job.max_train_samples:
        train = train.select(range(min(run.job.max_train_samples, len(train))))
    return train, (test if run.job.eval_dataset is None else None)


def _skip_generation_under_deepspeed(run: Run, held_out):
    """Greedy generation needs whole weights, which ZeRO-3 has partitioned: say so and evaluate nothing."""
    if uses_deepspeed(run.training) and held_out:
        say(f"Held-out evaluation by generation skipped under DeepSpeed ZeRO-3 ({len(held_out)} items): load the "
            "saved adapter in one process to evaluate it")
        return type(held_out)()
    return held_out


def _needs_eval_rows(run: Run, rows) -> None:
    if str(run.training.eval_strategy).split(".")[-1].lower() != "no" and not rows:
        raise UsageError("--eval_strategy needs held-out rows: --eval_samples > 0 (built-in data) or --eval_dataset")


# ---------------------------------------------------------------------------------------------- sft
def cmd_sft(run: Run) -> None:
    from datasets import Dataset

    from idlora_trl import IDLoRASFTTrainer
    from ..data import DataError, sft_dataset
    from ..evaluation import evaluate_accuracy, format_comparison, format_examples

    args, job = run.training, run.job
    start = time.perf_counter()
    peft_config = _peft_config(run)
    checkpoint = resolve_checkpoint(args)
    if _user_data(run) is None:
        try:
            train = sft_dataset("train", job.tasks, job.max_train_samples, seed=args.seed)
            held_out = sft_dataset("test", job.tasks, per_task=job.eval_samples).to_list() if job.eval_samples else []
        except DataError as error:
            raise UsageError(f"--tasks: {error}") from error
        data_label = f"built-in tasks {', '.join(sorted(set(train['task'])))}"
    else:
        (train, test), data_label = _user_rows(run, "sft"), _user_data(run)
        held_out = _eval_rows(test, job.eval_samples, "datasets' test split") if test is not None else []
    if job.eval_dataset is not None:
        held_out = _eval_rows(user_dataset(job.eval_dataset, "sft", run.script, "--eval_dataset"), job.eval_samples)
    _needs_eval_rows(run, held_out)
    model, tokenizer, model_label = load_model(run.model.model_name_or_path, run.model)
    say(f"Model: {model_label} ({count_base_parameters(model):,} parameters); data: {data_label} "
        f"({len(train)} training rows, {len(held_out)} held-out); loaded in {seconds(start)}")
    columns = tuple(c for c in ("prompt", "completion", "messages", "text") if c in train.column_names)
    eval_dataset = training_columns(Dataset.from_list(held_out), columns) if args.eval_strategy != "no" else None
    held_out = _skip_generation_under_deepspeed(run, held_out)

    before = {}
    if held_out:
        t0 = time.perf_counter()
        before = evaluate_accuracy(model, tokenizer, held_out, batch_size=job.eval_batch_size)
        say(f"\nHeld-out accuracy before training ({seconds(t0)}): "
            + ", ".join(f"{t} {r.accuracy:.3f}" for t, r in before.items()))

    trainer = setup_adapter(IDLoRASFTTrainer, run, peft_config, checkpoint, model=model, args=args,
                            train_dataset=training_columns(train, columns), eval_dataset=eval_dataset,
                            processing_class=tokenizer)
    use_our_printer(trainer, log_callback(args.max_steps, ("mean_token_accuracy",)))
    say(f"\nTraining {_length(trainer)}, batch {args.per_device_train_batch_size}, lr {args.learning_rate:g}"
        + (f", resuming from {checkpoint}" if checkpoint else "") + ":")
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    train_s = time.perf_counter() - t0

    save_adapter(trainer, args.output_dir)

    say("\n== Summary ==")
    say(f"training: {trainer.state.global_step} steps in {train_s:.1f} s; loss {loss_trend(trainer)}; "
        f"mean {result.training_loss:.4f}")
    after = {}
    if held_out:
        after = evaluate_accuracy(trainer.model, tokenizer, held_out, batch_size=job.eval_batch_size)
        say(format_comparison(before, after))
        say(format_examples(after, "Sample held-out replies after training:"))
    _finish(run, trainer, "held-out accuracy", before, after)
    say(f"total wall time {seconds(start)}")
    end_distributed()


def _length(trainer) -> str:
    args = trainer.args
    return f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"


def _finish(run: Run, trainer, metric: str, before: dict, after: dict, **extra) -> None:
    """Push to the Hub if asked (as `trl sft` does), write the picture, close the trackers."""
    if run.training.push_to_hub:
        trainer.push_to_hub(dataset_name=run.script.dataset_name)
    if run.job.plot and trainer.is_world_process_zero():
        path = write_picture(run, trainer.state.log_history, metric, before, after, **extra)
        if path:
            say(f"picture of the run: {path}")


def _eval_rows(dataset, limit: int, source: str = "--eval_dataset") -> list[dict]:
    if "prompt" not in dataset.column_names or "completion" not in dataset.column_names:
        raise UsageError(f"{source} needs 'prompt' and 'completion' columns (it is scored by generation), it has "
                         f"{sorted(dataset.column_names)}")
    rows = dataset.to_list()
    if limit:
        counts: dict[str, int] = {}
        kept = []
        for row in rows:
            task = row.get("task") or "dataset"
            if counts.get(task, 0) < limit:
                counts[task] = counts.get(task, 0) + 1
                kept.append(row)
        rows = kept
    return rows


# ---------------------------------------------------------------------------------------------- dpo
def _per_kind(dataset, limit: int):
    """The first `limit` held-out pairs of each kind (harmful, benign)."""
    seen: dict[str, int] = {}
    keep = []
    for i, kind in enumerate(dataset["kind"]):
        seen[kind] = seen.get(kind, 0) + 1
        if seen[kind] <= limit:
            keep.append(i)
    return dataset.select(keep)


def cmd_dpo(run: Run) -> None:
    from idlora_trl import IDLoRADPOTrainer
    from ..data import dpo_dataset, refusal_prompts
    from ..evaluation import format_comparison, format_examples, refusal_rates

    args, job = run.training, run.job
    start = time.perf_counter()
    peft_config = _peft_config(run)
    checkpoint = resolve_checkpoint(args)
    if _user_data(run) is None:
        train = dpo_dataset("train", job.max_train_samples, seed=args.seed)
        pairs = _per_kind(dpo_dataset("test"), job.eval_samples) if job.eval_samples else None
        data_label = "built-in safety set"
    else:
        (train, pairs), data_label = _user_rows(run, "dpo"), _user_data(run)
        if job.eval_dataset:
            pairs = user_dataset(job.eval_dataset, "dpo", run.script, "--eval_dataset")
    prompts = refusal_prompts("test")
    prompts = {kind: rows[:job.eval_samples] for kind, rows in prompts.items()} if job.eval_samples else {}
    _needs_eval_rows(run, pairs)
    model, tokenizer, model_label = load_model(run.model.model_name_or_path, run.model)
    say(f"Model: {model_label} ({count_base_parameters(model):,} parameters); data: {data_label} "
        f"({len(train)} preference pairs); loaded in {seconds(start)}")
    prompts = _skip_generation_under_deepspeed(run, prompts)  # reward metrics on held-out pairs still run

    def refusals(m) -> dict:
        return refusal_rates(m, tokenizer, prompts, max_new_tokens=job.max_new_tokens,
                             batch_size=job.eval_batch_size) if prompts else {}

    t0 = time.perf_counter()
    before = refusals(model)
    if before:
        say(f"\nRefusal rate on held-out prompts before training ({seconds(t0)}): "
            + ", ".join(f"{k} {r.accuracy:.3f}" for k, r in before.items()))

    columns = tuple(c for c in ("prompt", "chosen", "rejected") if c in train.column_names)
    trainer = setup_adapter(IDLoRADPOTrainer, run, peft_config, checkpoint, model=model, ref_model=None, args=args,
                            train_dataset=training_columns(train, columns),
                            eval_dataset=training_columns(pairs, columns) if pairs is not None else None,
                            processing_class=tokenizer)
    use_our_printer(trainer, log_callback(args.max_steps, ("rewards/accuracies", "rewards/margins")))
    losses = " + ".join(args.loss_type if isinstance(args.loss_type, (list, tuple)) else [args.loss_type])
    say(f"\nTraining {_length(trainer)}, batch {args.per_device_train_batch_size}, lr {args.learning_rate:g}, "
        f"beta {args.beta:g}, loss {losses}" + (f", resuming from {checkpoint}" if checkpoint else "") + ":")
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    train_s = time.perf_counter() - t0
    logs = [log for log in trainer.state.log_history if "rewards/accuracies" in log]
    held_out_metrics = trainer.evaluate() if pairs is not None else {}

    save_adapter(trainer, args.output_dir)

    say("\n== Summary ==")
    if logs:
        first, last = logs[0], logs[-1]
        say(f"training: {trainer.state.global_step} steps in {train_s:.1f} s; loss {loss_trend(trainer)}; "
            f"reward accuracy {first['rewards/accuracies']:.3f} -> {last['rewards/accuracies']:.3f}; "
            f"reward margin {first['rewards/margins']:.3f} -> {last['rewards/margins']:.3f} (first and last logs)")
    if held_out_metrics:
        say(f"held-out pairs ({len(pairs)}): "
            f"reward accuracy {held_out_metrics.get('eval_rewards/accuracies', 0):.3f}, "
            f"reward margin {held_out_metrics.get('eval_rewards/margins', 0):.3f}, "
            f"loss {held_out_metrics.get('eval_loss', 0):.4f}")
    after = {}
    if before:
        after = refusals(trainer.model)
        say(format_comparison(before, after, metric="refusal rate", label="prompts"))
        say(format_examples(after, "Sample held-out replies after training:"))
    _finish(run, trainer, "refusal rate", before, after)
    say(f"total wall time {seconds(start)}")
    end_distributed()
