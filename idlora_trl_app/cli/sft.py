"""`idlora-trl sft`: ID-LoRA supervised fine-tuning with TRL's SFTTrainer (`IDLoRASFTTrainer`), parsed as `trl sft`.

# The main job: the embedded SmolLM2-135M-Instruct on the built-in tasks (arithmetic, sentiment, instructions)
```bash
idlora-trl sft
```
Prints the parameter table against LoRA, the loss every few steps and held-out exact-match accuracy per task before
and after; saves the adapter and a picture of the run (`run.png`) into --output_dir.

# Your model and data, as with `trl sft`
```bash
idlora-trl sft \\
    --model_name_or_path Qwen/Qwen2-0.5B \\
    --dataset_name data.jsonl \\
    --eval_dataset held_out.jsonl \\
    --idlora_r 64 \\
    --lora_target_modules q_proj k_proj v_proj gate_proj up_proj \\
    --num_train_epochs 1 --max_steps -1 \\
    --save_steps 500 \\
    --output_dir Qwen2-0.5B-SFT-IDLoRA
```
`--resume_from_checkpoint DIR` (or `last`) continues from a checkpoint without clustering again; `--config FILE.yaml`
takes TRL's format (flags override it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..defaults import SFT_DEFAULTS
from .training import Evaluation, JobArguments, TrainingRun, training_parser

DESCRIPTION = ("ID-LoRA supervised fine-tuning with TRL's SFTTrainer. Every TRL option (`trl sft --help`), the ID-LoRA "
               "settings (--idlora_*), and --config FILE.yaml (TRL's format; flags override it). Without "
               "--model_name_or_path and --dataset_name: the main job (SmolLM2-135M-Instruct on built-in tasks).")


@dataclass
class SFTJobArguments(JobArguments):
    tasks: str = field(default="all", metadata={
        "help": "Built-in tasks, comma-separated: arithmetic, sentiment, instructions, or all (without "
                "--dataset_name)."})


def main(script_args, training_args, model_args, dataset_args, idlora_args, job_args):
    from datasets import Dataset

    from idlora_trl import IDLoRASFTTrainer

    from ..evaluation import evaluate_accuracy
    from . import main_job
    from .printing import loss_trend
    from .training_data import eval_rows, training_columns, user_data, user_dataset, user_rows

    run = TrainingRun("sft", script_args, training_args, model_args, dataset_args, idlora_args, job_args)

    # Load the dataset: the user's (--dataset_name, a `datasets:` mixture) or the built-in tasks; held-out rows
    data = user_data(script_args, dataset_args)
    if data is None:
        train, held_out, data = main_job.sft_data(job_args, training_args.seed)
    else:
        train, test = user_rows(script_args, dataset_args, job_args, "sft")
        held_out = eval_rows(test, job_args.eval_samples, "datasets' test split") if test is not None else []
    if job_args.eval_dataset is not None:
        held_out = eval_rows(user_dataset(job_args.eval_dataset, "sft", script_args, "--eval_dataset"),
                             job_args.eval_samples)
    run.needs_eval_rows(held_out)

    # Load the model
    model, tokenizer = run.load_model(f"{data} ({len(train)} training rows, {len(held_out)} held-out)")
    columns = tuple(c for c in ("prompt", "completion", "messages", "text") if c in train.column_names)
    eval_dataset = (training_columns(Dataset.from_list(held_out), columns)
                    if training_args.eval_strategy != "no" else None)
    held_out = run.generation_allowed(held_out)

    # Held-out exact-match accuracy per task, by generation
    def accuracy(m) -> dict:
        return evaluate_accuracy(m, tokenizer, held_out, batch_size=job_args.eval_batch_size) if held_out else {}

    def summarise(trainer, result, seconds: float) -> list[str]:
        return [f"training: {trainer.state.global_step} steps in {seconds:.1f} s; loss {loss_trend(trainer)}; "
                f"mean {result.training_loss:.4f}"]

    # Train with the ID-LoRA SFT trainer, evaluate before and after, save the adapter, draw the run
    run.train(IDLoRASFTTrainer, Evaluation(accuracy, "Held-out accuracy before training", "held-out accuracy"),
              ("mean_token_accuracy",), summarise, model=model, train_dataset=training_columns(train, columns),
              eval_dataset=eval_dataset, processing_class=tokenizer)


def make_parser(subparsers=None, prog: str | None = None):
    from trl import SFTConfig

    return training_parser("sft", SFTConfig, SFTJobArguments, SFT_DEFAULTS, DESCRIPTION, subparsers, prog)
