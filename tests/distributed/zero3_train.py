"""One rank of an SFT or DPO run with ID-LoRA under DeepSpeed ZeRO-3 on CPU (gloo).

    torchrun --nproc_per_node 2 tests/distributed/zero3_train.py {sft,dpo} OUT [--max-steps N]
        [--save-steps N] [--resume CHECKPOINT]

The trainer config (with the DeepSpeed config) is built before the model, so `from_config` builds the model
inside `zero.Init` and partitions it at once; the trainer then wraps it with peft (the decomposition gathers
each weight through the DeepSpeed plugin, which is found by its entry point: this script never registers it).
Writes OUT/rank{R}.json on every rank, and on rank 0: OUT/indices.pt, OUT/base/ (config and full base
weights, gathered), OUT/logits.pt (input ids and the trained model's logits), OUT/adapter/ (trainer.save_model).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (BF16_CONFIG, CPU_CONFIG, WeightContextProbe, all_equal_across_ranks, base_name, dpo_dataset,
                    idlora_config, indices_hash, init_deepspeed, sft_dataset, shutdown, tiny_llama_config, write_json)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trainer", choices=["sft", "dpo"])
    parser.add_argument("out")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--bf16", action="store_true", help="zero3_bf16.json and a bf16 model (slow on CPU)")
    args, _ = parser.parse_known_args()  # the deepspeed launcher adds --local_rank=N
    out = Path(args.out)

    rank, world = init_deepspeed()
    import deepspeed
    import torch
    from helpers import make_tokenizer, registered
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from transformers import AutoModelForCausalLM, TrainerCallback, set_seed
    from trl import DPOConfig, SFTConfig

    from idlora_trl import IDLoRADPOTrainer, IDLoRASFTTrainer, get_indices
    from idlora_trl.plugins import get_plugin_manager
    from idlora_trl.skeleton import idlora_layers

    facts: dict = {"rank": rank, "world": world}
    facts["plugins"] = sorted(name for name, _ in get_plugin_manager().list_name_plugin())

    common = dict(output_dir=str(out / "trainer"), deepspeed=BF16_CONFIG if args.bf16 else CPU_CONFIG,
                  use_cpu=True, bf16=args.bf16,
                  gradient_checkpointing=False, report_to="none", seed=0, logging_steps=1, max_length=64,
                  per_device_train_batch_size=4, lr_scheduler_type="constant", max_steps=args.max_steps,
                  save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500)
    if args.trainer == "sft":
        config = SFTConfig(learning_rate=5e-2, **common)  # before the model: it turns zero.Init on
        trainer_cls, data = IDLoRASFTTrainer, sft_dataset()
    else:
        config = DPOConfig(learning_rate=3e-2, beta=0.1, **common)
        trainer_cls, data = IDLoRADPOTrainer, dpo_dataset()

    tok = make_tokenizer()
    set_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(
        len(tok), bias=args.trainer == "sft", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id), dtype=torch.bfloat16 if args.bf16 else torch.float32)
    q = model.model.layers[0].self_attn.q_proj
    facts["partitioned_at_creation"] = (tuple(q.weight.shape) == (0,) and tuple(q.weight.ds_shape) == (64, 64)
                                        and (q.bias is None or tuple(q.bias.shape) == (0,)))

    class PartitionCheck(TrainerCallback):
        """After every optimizer step: are the frozen base weights (and biases) still partitioned?"""

        def __init__(self) -> None:
            self.steps: list[dict] = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            base, fractions = [], []
            for _, layer in idlora_layers(model):
                for p in (layer.get_base_layer().weight, layer.get_base_layer().bias):
                    if p is None:
                        continue
                    base.append(tuple(p.shape) == (0,) and p.ds_status == ZeroParamStatus.NOT_AVAILABLE
                                and not p.requires_grad)
                    fractions.append(p.ds_tensor.numel() / p.ds_numel)
            adapters = [p for n, p in model.named_parameters() if "idlora_" in n]
            self.steps.append({
                "dtypes": sorted({f"{'adapter' if 'idlora_' in n else 'base'}:{p.dtype}"
                                  for n, p in model.named_parameters()}),
                "step": state.global_step, "layers": len(idlora_layers(model)), "base_partitioned": all(base),
                "max_shard_fraction": max(fractions),
                "adapters_partitioned": all(hasattr(p, "ds_id") and tuple(p.shape) == (0,) for p in adapters),
            })

    check = PartitionCheck()
    start = time.perf_counter()
    with registered(WeightContextProbe(), name="test-probe") as probe:  # sees the decomposition (in the trainer)
        trainer = trainer_cls(model, args=config, train_dataset=data, processing_class=tok,
                              peft_config=idlora_config(), callbacks=[check])
    facts["wrap_s"] = time.perf_counter() - start
    facts["weight_contexts"] = probe.records
    facts["peak_gathered_bytes"] = probe.peak_live_bytes
    facts["still_partitioned_after_decomposition"] = tuple(q.weight.shape) == (0,)
    indices = get_indices(trainer.model)
    facts["indices_hash"] = indices_hash(indices)
    facts["indices_equal_across_ranks"] = all_equal_across_ranks(facts["indices_hash"])

    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=args.resume)
    facts["train_s"] = time.perf_counter() - start
    facts["log_history"] = trainer.state.log_history
    facts["partition_checks"] = check.steps
    facts["global_step"] = trainer.state.global_step

    trainer.save_model(str(out / "adapter"))  # collective (gathers the adapter); rank 0 writes

    # The trained model's logits, through the DeepSpeed engine (it fetches the partitioned weights).
    engine = trainer.model_wrapped
    engine.eval()
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = engine(input_ids=ids).logits.float()
    facts["logits_equal_across_ranks"] = all_equal_across_ranks(logits.numpy().tobytes())

    # The full base weights (frozen, so the same as at the start), for a single-process rebuild.
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    base = [(n, p) for n, p in unwrapped.named_parameters() if "idlora_" not in n]
    with deepspeed.zero.GatheredParameters([p for _, p in base], modifier_rank=None):
        state = {base_name(n): p.detach().clone() for n, p in base}
    if rank == 0:
        (out / "base").mkdir(parents=True, exist_ok=True)
        unwrapped.get_base_model().config.save_pretrained(out / "base")
        torch.save(state, out / "base" / "weights.pt")
        torch.save(indices, out / "indices.pt")
        torch.save({"input_ids": ids, "logits": logits}, out / "logits.pt")
    write_json(out / f"rank{rank}.json", facts)


if __name__ == "__main__":
    main()
    shutdown()
