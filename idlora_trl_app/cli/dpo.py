"""`idlora-trl dpo`: ID-LoRA DPO with TRL's DPOTrainer (`IDLoRADPOTrainer`), parsed as `trl dpo`. The reference model
is the base with the adapter disabled.

# The main job: safety DPO of the embedded SmolLM2-135M-Instruct on the built-in preference set
```bash
idlora-trl dpo
```
Prints reward accuracies and margins (training and held-out pairs), and the refusal rate on held-out harmful and
benign prompts before and after; saves the adapter and a picture of the run (`run.png`) into --output_dir.

# Your model and preference pairs (`prompt`, `chosen`, `rejected`), as with `trl dpo`
```bash
idlora-trl dpo \\
    --model_name_or_path Qwen/Qwen2-0.5B-Instruct \\
    --dataset_name pairs.jsonl \\
    --eval_dataset held_out_pairs.jsonl \\
    --beta 0.1 --loss_type sigmoid sft \\
    --num_train_epochs 1 --max_steps -1 \\
    --output_dir Qwen2-0.5B-DPO-IDLoRA
```
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..defaults import DPO_DEFAULTS
from .training import Evaluation, JobArguments, TrainingRun, training_parser

DESCRIPTION = ("ID-LoRA DPO with TRL's DPOTrainer; the reference is the base model with the adapter disabled. "
               "Every TRL option (`trl dpo --help`), the ID-LoRA settings (--idlora_*), and --config FILE.yaml. "
               "Without --model_name_or_path and --dataset_name: safety DPO of SmolLM2-135M-Instruct on the built-in "
               "set.")


@dataclass
class DPOJobArguments(JobArguments):
    max_new_tokens: int = field(default=24, metadata={"help": "Reply length of the refusal-rate evaluation."})


def main(script_args, training_args, model_args, dataset_args, idlora_args, job_args):
    from idlora_trl import IDLoRADPOTrainer

    from ..data import refusal_prompts
    from ..evaluation import refusal_rates
    from . import main_job
    from .printing import loss_trend
    from .training_data import training_columns, user_data, user_dataset, user_rows

    run = TrainingRun("dpo", script_args, training_args, model_args, dataset_args, idlora_args, job_args)

    # Load the preference pairs: the user's (--dataset_name, a `datasets:` mixture) or the built-in safety set
    data = user_data(script_args, dataset_args)
    if data is None:
        train, pairs, data = main_job.dpo_data(job_args, training_args.seed)
    else:
        train, pairs = user_rows(script_args, dataset_args, job_args, "dpo")
        if job_args.eval_dataset:
            pairs = user_dataset(job_args.eval_dataset, "dpo", script_args, "--eval_dataset")
    prompts = refusal_prompts("test")  # held-out harmful and benign prompts, whatever the training data
    prompts = {kind: rows[:job_args.eval_samples] for kind, rows in prompts.items()} if job_args.eval_samples else {}
    run.needs_eval_rows(pairs)

    # Load the model
    model, tokenizer = run.load_model(f"{data} ({len(train)} preference pairs)")
    prompts = run.generation_allowed(prompts)  # reward metrics on held-out pairs still run

    # Held-out refusal rates, by generation
    def refusals(m) -> dict:
        return refusal_rates(m, tokenizer, prompts, max_new_tokens=job_args.max_new_tokens,
                             batch_size=job_args.eval_batch_size) if prompts else {}

    def summarise(trainer, result, seconds: float) -> list[str]:
        logs = [log for log in trainer.state.log_history if "rewards/accuracies" in log]
        held_out = trainer.evaluate() if pairs is not None else {}
        lines = []
        if logs:
            first, last = logs[0], logs[-1]
            lines.append(f"training: {trainer.state.global_step} steps in {seconds:.1f} s; loss {loss_trend(trainer)}; "
                         f"reward accuracy {first['rewards/accuracies']:.3f} -> {last['rewards/accuracies']:.3f}; "
                         f"reward margin {first['rewards/margins']:.3f} -> {last['rewards/margins']:.3f} (first and "
                         "last logs)")
        if held_out:
            lines.append(f"held-out pairs ({len(pairs)}): reward accuracy "
                         f"{held_out.get('eval_rewards/accuracies', 0):.3f}, reward margin "
                         f"{held_out.get('eval_rewards/margins', 0):.3f}, loss {held_out.get('eval_loss', 0):.4f}")
        return lines

    # Train with the ID-LoRA DPO trainer, evaluate before and after, save the adapter, draw the run
    columns = tuple(c for c in ("prompt", "chosen", "rejected") if c in train.column_names)
    losses = training_args.loss_type
    losses = " + ".join(losses if isinstance(losses, (list, tuple)) else [losses])
    run.train(IDLoRADPOTrainer,
              Evaluation(refusals, "Refusal rate on held-out prompts before training", "refusal rate",
                         dict(metric="refusal rate", label="prompts")),
              ("rewards/accuracies", "rewards/margins"), summarise,
              details=f", beta {training_args.beta:g}, loss {losses}", model=model, ref_model=None,
              train_dataset=training_columns(train, columns),
              eval_dataset=training_columns(pairs, columns) if pairs is not None else None, processing_class=tokenizer)


def make_parser(subparsers=None, prog: str | None = None):
    from trl import DPOConfig

    return training_parser("dpo", DPOConfig, DPOJobArguments, DPO_DEFAULTS, DESCRIPTION, subparsers, prog)
