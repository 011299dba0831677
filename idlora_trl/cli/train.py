"""The training commands of `idlora-trl`: `sft`, `dpo` and `decompose`.

- `idlora-trl sft`: ID-LoRA SFT with `IDLoRASFTTrainer`. Defaults: the embedded SmolLM2-135M-Instruct and the
  built-in multi-task mix (arithmetic, sentiment, instructions); prints the parameter table against LoRA, the
  loss every few steps and held-out exact-match accuracy per task before and after; saves the adapter.
- `idlora-trl dpo`: ID-LoRA DPO with `IDLoRADPOTrainer` (reference: the base with the adapter disabled).
  Defaults: the embedded model and the built-in safety set; prints reward accuracies and margins (training
  and held-out pairs), and the refusal rate on held-out harmful and benign prompts before and after.
- `idlora-trl decompose`: clusters a model once and writes the index file that later runs reuse with
  `--indices-path` (or `IDLoRAConfig(indices_path=...)`).

Every setting is a flag, or a key of a `--config file.yaml|json` named like the flag (`max-steps` or
`max_steps`); flags override the file. Bad input is a one-line error with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import time

from .args import (DPO_DEFAULTS, FLAGS_NOTE, SFT_DEFAULTS, HelpFormatter, add_model_and_idlora, add_training,
                   build_idlora_config, finish, non_negative_float, positive_float, positive_int, resolve)
from .common import UsageError
from .runtime import (count_base_parameters, end_distributed, first_line, load_model, log_callback, loss_trend,
                      make_training_args, save_adapter, say, seconds, setup_adapter, training_columns,
                      use_our_printer, user_dataset)


def register(commands) -> None:
    """Add `sft`, `dpo` and `decompose` to the `idlora-trl` subcommands."""
    sft = commands.add_parser("sft", formatter_class=HelpFormatter,
                              help="ID-LoRA SFT (default: SmolLM2-135M on the built-in multi-task mix)",
                              description="ID-LoRA supervised fine-tuning with TRL. " + FLAGS_NOTE)
    add_model_and_idlora(sft, r=SFT_DEFAULTS["r"])
    add_training(sft, SFT_DEFAULTS)
    sft.add_argument("--tasks", default="all",
                     help="built-in tasks, comma-separated: arithmetic, sentiment, instructions, or all")
    finish(sft, cmd_sft)

    dpo = commands.add_parser("dpo", formatter_class=HelpFormatter,
                              help="ID-LoRA DPO (default: SmolLM2-135M on the built-in safety set)",
                              description="ID-LoRA DPO with TRL; ref_model=None (the base with the adapter "
                                          "disabled). " + FLAGS_NOTE)
    add_model_and_idlora(dpo, r=DPO_DEFAULTS["r"])
    add_training(dpo, DPO_DEFAULTS)
    dpo.add_argument("--beta", type=positive_float, default=DPO_DEFAULTS["beta"], help="DPO beta")
    dpo.add_argument("--sft-weight", type=non_negative_float, default=DPO_DEFAULTS["sft_weight"],
                     help="weight of an NLL term on the chosen replies added to the DPO loss (TRL's loss_type "
                          "['sigmoid', 'sft'], as in RPO); 0: plain DPO, which on this small model lowers both "
                          "replies' likelihood and garbles generation")
    dpo.add_argument("--max-new-tokens", type=positive_int, default=24, help="reply length for refusal checks")
    finish(dpo, cmd_dpo)

    decompose = commands.add_parser("decompose", formatter_class=HelpFormatter,
                                    help="cluster a model once and write its ID-LoRA index file",
                                    description="Cluster a model's weights once and write the index file that "
                                                "sft/dpo (--indices-path) and IDLoRAConfig(indices_path=...) reuse. "
                                                + FLAGS_NOTE)
    add_model_and_idlora(decompose, r=SFT_DEFAULTS["r"])
    decompose.add_argument("--output", default=None, metavar="FILE",
                           help="index file to write (default: outputs/indices-<model>-r<r>-k<k>.safetensors)")
    finish(decompose, cmd_decompose)


# ---------------------------------------------------------------------------------------------- sft
def cmd_sft(args: argparse.Namespace) -> None:
    from trl import SFTConfig

    from .. import IDLoRASFTTrainer
    from ..data import DataError, sft_dataset
    from ..evaluation import evaluate_accuracy, format_comparison, format_examples

    opts = resolve(args)
    start = time.perf_counter()
    peft_config = build_idlora_config(opts)
    if opts.dataset is None:
        try:
            train = sft_dataset("train", opts.tasks, opts.max_train_samples, seed=opts.seed)
            held_out = (sft_dataset("test", opts.tasks, per_task=opts.eval_samples).to_list()
                        if opts.eval_samples else [])
        except DataError as error:
            raise UsageError(str(error)) from error
        data_label = f"built-in tasks {', '.join(sorted(set(train['task'])))}"
    else:
        train = user_dataset(opts.dataset, "sft", opts)
        if opts.max_train_samples:
            train = train.select(range(min(opts.max_train_samples, len(train))))
        data_label = opts.dataset
        held_out = []
    if opts.eval_dataset is not None:
        held_out = _eval_rows(user_dataset(opts.eval_dataset, "sft", opts), opts.eval_samples)
    training_args = make_training_args(SFTConfig, opts)  # before the model: with --deepspeed it turns zero.Init on
    model, tokenizer, model_label = load_model(opts.model)
    say(f"Model: {model_label} ({count_base_parameters(model):,} parameters); data: {data_label} "
        f"({len(train)} training rows, {len(held_out)} held-out); loaded in {seconds(start)}")
    held_out = _skip_generation_under_deepspeed(opts, held_out)

    before = {}
    if held_out:
        t0 = time.perf_counter()
        before = evaluate_accuracy(model, tokenizer, held_out, batch_size=opts.eval_batch_size)
        say(f"\nHeld-out accuracy before training ({seconds(t0)}): "
            + ", ".join(f"{t} {r.accuracy:.3f}" for t, r in before.items()))

    columns = tuple(c for c in ("prompt", "completion", "messages", "text") if c in train.column_names)
    trainer = setup_adapter(IDLoRASFTTrainer, opts, peft_config, model=model, args=training_args,
                            train_dataset=training_columns(train, columns), processing_class=tokenizer)
    use_our_printer(trainer, log_callback(opts.max_steps, ("mean_token_accuracy",)))
    say(f"\nTraining {opts.max_steps} steps, batch {opts.batch_size}, lr {opts.learning_rate:g}:")
    t0 = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t0

    save_adapter(trainer, opts.output_dir)

    say("\n== Summary ==")
    say(f"training: {trainer.state.global_step} steps in {train_s:.1f} s; loss {loss_trend(trainer)}; "
        f"mean {result.training_loss:.4f}")
    if held_out:
        after = evaluate_accuracy(trainer.model, tokenizer, held_out, batch_size=opts.eval_batch_size)
        say(format_comparison(before, after))
        say(format_examples(after, "Sample held-out replies after training:"))
    say(f"total wall time {seconds(start)}")
    end_distributed()


def _skip_generation_under_deepspeed(opts, held_out):
    """Greedy generation needs whole weights, which ZeRO-3 has partitioned: say so and evaluate nothing."""
    if opts.deepspeed and held_out:
        say(f"Held-out evaluation by generation skipped under --deepspeed ({len(held_out)} items): load the saved "
            "adapter in one process to evaluate it")
        return type(held_out)()
    return held_out


def _eval_rows(dataset, limit: int) -> list[dict]:
    if "prompt" not in dataset.column_names or "completion" not in dataset.column_names:
        raise UsageError(f"the evaluation dataset needs 'prompt' and 'completion' columns, it has "
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


def cmd_dpo(args: argparse.Namespace) -> None:
    from trl import DPOConfig

    from .. import IDLoRADPOTrainer
    from ..data import dpo_dataset, refusal_prompts
    from ..evaluation import format_comparison, format_examples, refusal_rates

    opts = resolve(args)
    start = time.perf_counter()
    peft_config = build_idlora_config(opts)
    if opts.dataset is None:
        train = dpo_dataset("train", opts.max_train_samples, seed=opts.seed)
        pairs = _per_kind(dpo_dataset("test"), opts.eval_samples) if opts.eval_samples else None
        data_label = "built-in safety set"
    else:
        train = user_dataset(opts.dataset, "dpo", opts)
        if opts.max_train_samples:
            train = train.select(range(min(opts.max_train_samples, len(train))))
        pairs = user_dataset(opts.eval_dataset, "dpo", opts) if opts.eval_dataset else None
        data_label = opts.dataset
    prompts = refusal_prompts("test")
    prompts = {kind: rows[:opts.eval_samples] for kind, rows in prompts.items()} if opts.eval_samples else {}
    losses = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, opts.sft_weight]) if opts.sft_weight else {}
    config = make_training_args(DPOConfig, opts, beta=opts.beta, **losses)  # before the model (zero.Init)
    model, tokenizer, model_label = load_model(opts.model)
    say(f"Model: {model_label} ({count_base_parameters(model):,} parameters); data: {data_label} "
        f"({len(train)} preference pairs); loaded in {seconds(start)}")
    prompts = _skip_generation_under_deepspeed(opts, prompts)  # reward metrics on held-out pairs still run

    def refusals(m) -> dict:
        return refusal_rates(m, tokenizer, prompts, max_new_tokens=opts.max_new_tokens,
                             batch_size=opts.eval_batch_size) if prompts else {}

    t0 = time.perf_counter()
    before = refusals(model)
    if before:
        say(f"\nRefusal rate on held-out prompts before training ({seconds(t0)}): "
            + ", ".join(f"{k} {r.accuracy:.3f}" for k, r in before.items()))

    columns = tuple(c for c in ("prompt", "chosen", "rejected") if c in train.column_names)
    trainer = setup_adapter(IDLoRADPOTrainer, opts, peft_config, model=model, ref_model=None, args=config,
                            train_dataset=training_columns(train, columns),
                            eval_dataset=training_columns(pairs, columns) if pairs is not None else None,
                            processing_class=tokenizer)
    use_our_printer(trainer, log_callback(opts.max_steps, ("rewards/accuracies", "rewards/margins")))
    say(f"\nTraining {opts.max_steps} steps, batch {opts.batch_size}, lr {opts.learning_rate:g}, "
        f"beta {opts.beta:g}, loss {' + '.join(config.loss_type)}:")
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    logs = [log for log in trainer.state.log_history if "rewards/accuracies" in log]
    held_out_metrics = trainer.evaluate() if pairs is not None else {}

    save_adapter(trainer, opts.output_dir)

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
    if before:
        after = refusals(trainer.model)
        say(format_comparison(before, after, metric="refusal rate", label="prompts"))
        say(format_examples(after, "Sample held-out replies after training:"))
    say(f"total wall time {seconds(start)}")
    end_distributed()


# ---------------------------------------------------------------------------------------- decompose
def cmd_decompose(args: argparse.Namespace) -> None:
    from peft import get_peft_model

    from .. import get_indices, save_indices  # the public API (module layout may change)

    opts = resolve(args)
    opts.indices_path = None
    peft_config = build_idlora_config(opts)
    start = time.perf_counter()
    model, _, label = load_model(opts.model)
    output = opts.output or os.path.join(
        "outputs", f"indices-{label}-r{opts.r}-k{opts.num_clusters}-{opts.selection}.safetensors")
    if os.path.isdir(output):
        raise UsageError(f"--output {output!r} is a directory; give a file name")
    t0 = time.perf_counter()
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as error:
        raise UsageError(first_line(error)) from error
    clustering_s = time.perf_counter() - t0
    indices = get_indices(peft_model)
    save_indices(output, indices, peft_config.decomposition_spec())
    print(f"Clustered {len(indices)} modules of {label} ({peft_config.selection}, r={opts.r}, k={opts.num_clusters}) "
          f"in {clustering_s:.1f} s; wrote {os.path.abspath(output)}")
    print(f"Reuse it with: idlora-trl sft --indices-path {output}  (or IDLoRAConfig(indices_path=...)); "
          f"total {seconds(start)}")
