"""One rank of ID-LoRA trained under torch's FSDP2 (`fully_shard`), beside the same training in one process.

    torchrun --nproc_per_node 2 tests/distributed/fsdp2_train.py OUT

Every rank joins a gloo group, builds helpers' `make_llama(seed=0)` and adds ID-LoRA with a plain `get_peft_model`
(the decomposition splits the modules over the ranks and shares the indices). Then:

1. **One process**: a deep copy of that model, not sharded, trains STEPS steps of AdamW on the whole batch of
   4 rows. Every rank computes it alike; it is the reference.
2. **FSDP2**: each decoder layer, then the whole `PeftModel`, wrapped with `fully_shard` on a 2-rank CPU mesh
   (the frozen base weights and the adapter's `B` and `T` sharded alike), trains on this rank's 2 rows of the
   same batch. FSDP2 averages the gradients over the ranks and every row has the same length, so each step
   equals the reference's: the mean of the two ranks' losses is the reference's loss.

Writes OUT/rank{R}.pt: the adapter state each rank started from, the indices, both loss curves, and the full
adapter state after training (DTensors gathered with `full_tensor()`); rank 0 also saves the trained adapter
with `save_pretrained` from the full state dict (`get_model_state_dict(..., full_state_dict=True)`), as a user
of FSDP2 saves one, to OUT/adapter.

3. **Through the Trainer**: an `IDLoRASFTTrainer` asked for FSDP (`fsdp="full_shard"`, FSDP2) on these CPU ranks;
   accelerate runs it as DDP instead (MULTI_CPU). Records the distributed type and the trainer's warnings.
4. **Too late**: `get_peft_model` on a model already sharded by `fully_shard`. Records the error.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from common import idlora_config, shutdown

STEPS = 6
LR = 1e-2  # a rate at which ID-LoRA visibly moves the tiny model in 6 steps


def train(model, batch, steps: int):
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


def adapter_state(model) -> dict:
    from torch.distributed.tensor import DTensor

    return {name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
            for name, value in model.state_dict().items() if "idlora_" in name}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    import torch.distributed as dist
    from helpers import VOCAB, make_llama
    from peft import get_peft_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from idlora_trl import get_indices

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = get_peft_model(make_llama(seed=0), idlora_config()).train()
    start = adapter_state(model)
    reference = copy.deepcopy(model)

    batch = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    reference_losses = train(reference, batch, STEPS)

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = model.base_model.model.model.layers[0].self_attn.q_proj.idlora_B["default"].weight
    local = batch.chunk(world)[rank]
    losses = train(model, local, STEPS)
    mean_losses = losses.clone()
    dist.all_reduce(mean_losses)
    mean_losses /= world

    facts = {"start": start, "indices": get_indices(model), "reference_losses": reference_losses,
             "losses": losses, "mean_losses": mean_losses, "reference_final": adapter_state(reference),
             "final": adapter_state(model), "B_is_dtensor": type(sharded).__name__ == "DTensor"}
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(out / "adapter", state_dict=full)
    facts.update(trainer_asked_for_fsdp(out))
    late = make_llama(seed=0)
    fully_shard(late, mesh=mesh)
    try:
        get_peft_model(late, idlora_config())
        facts["sharded_first"] = "no error"
    except ValueError as error:
        facts["sharded_first"] = str(error)
    torch.save(facts, out / f"rank{rank}.pt")


def trainer_asked_for_fsdp(out: Path) -> dict:
    import logging

    from datasets import Dataset
    from helpers import make_llama, make_tokenizer
    from trl import SFTConfig

    from idlora_trl import IDLoRASFTTrainer

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record) -> None:
            self.messages.append(record.getMessage())

    collect = Collect()
    logging.getLogger("transformers").addHandler(collect)
    args = SFTConfig(output_dir=str(out / "trainer"), fsdp="full_shard", fsdp_config={"fsdp_version": 2},
                     use_cpu=True, bf16=False, max_steps=1, report_to=[], save_strategy="no")
    trainer = IDLoRASFTTrainer(make_llama(seed=0), args=args, processing_class=make_tokenizer(),
                               train_dataset=Dataset.from_list([{"text": "one two three four"}] * 4),
                               peft_config=idlora_config())
    logging.getLogger("transformers").removeHandler(collect)
    return {"trainer_distributed_type": trainer.accelerator.distributed_type.value,
            "trainer_fsdp_enabled": bool(trainer.is_fsdp_enabled), "trainer_warnings": collect.messages}


if __name__ == "__main__":
    main()
    shutdown()
