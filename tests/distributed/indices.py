"""One rank of plain `get_peft_model` runs on several processes: plain DDP, then DeepSpeed ZeRO-3.

    torchrun --nproc_per_node 2 tests/distributed/indices.py OUT [--fail-rank R]

1. Plain `torch.distributed` (gloo), no DeepSpeed: helpers' `make_llama(seed=0)` on every rank, then
   `get_peft_model`. Writes OUT/ddp_rank{R}.pt: the indices and the modules this rank clustered itself.
2. ZeRO-3: the same weights in a model partitioned by `zero.Init` (`HfDeepSpeedConfig` alive, `from_config`),
   then a plain `get_peft_model`; the DeepSpeed plugin comes from the entry point. Writes OUT/zero3_rank{R}.pt.
   Step 1 clusters all of a rank's copies in one window (the default budget), step 2 one group at a time.
   Step 2 also records what the DeepSpeed weight context gave this rank for each module (a copy of the tensor,
   or None) and the state of `module.weight` inside it; then, outside the decomposition, what it gives each
   owner for a 5x7 weight (35 elements: the last shard is padded), in float32 and bfloat16, and for a weight
   already whole inside `GatheredParameters`.

With `--fail-rank R`, only step 2 runs and a test plugin raises while rank R clusters its first module: every
rank must end with an error (written to OUT/error_rank{R}.txt), none may hang. With `--crash` as well, rank R
dies instead (`os._exit`): the launcher must end the other rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import CPU_CONFIG, WeightContextProbe, hookimpl, idlora_config, init_deepspeed, shutdown
from helpers import ClusteringCounter, make_llama, registered


class FailOnRank:
    """Raises (or, with `crash`, kills the process without a word) when rank `rank` clusters a module."""

    def __init__(self, rank: int, crash: bool) -> None:
        self.rank, self.crash = rank, crash

    @hookimpl(tryfirst=True)
    def idlora_select_rows(self, weight, module_name, config):
        import torch.distributed as dist

        if dist.get_rank() == self.rank:
            if self.crash:
                os._exit(3)
            raise RuntimeError("injected failure")
        return None


def gathered_by_owner(module, world: int) -> list:
    """What the weight context of `module` gives this rank with each owner in turn (a copy, or None)."""
    from idlora_trl.plugins import get_plugin_manager

    answers = []
    for owner in range(world):
        with get_plugin_manager().hook.idlora_weight_context(module=module, module_name="probe",
                                                             owner_rank=owner) as value:
            answers.append(None if value is None else value.detach().clone())
    return answers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--crash", action="store_true", help="with --fail-rank: die instead of raising")
    args, _ = parser.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    counter = ClusteringCounter()  # which modules this rank clusters
    with registered(counter, name="test-count"):
        if args.fail_rank is None:
            plain_ddp(out, counter)
            counter.modules.clear()
        zero3(args, out, counter)


def plain_ddp(out: Path, counter: ClusteringCounter) -> None:
    """Step 1: plain `torch.distributed` (gloo), no DeepSpeed."""
    import torch
    import torch.distributed as dist
    from peft import get_peft_model

    from idlora_trl import get_indices

    dist.init_process_group("gloo")  # plain DDP-style process group, no DeepSpeed
    rank = dist.get_rank()
    model = get_peft_model(make_llama(seed=0), idlora_config())
    torch.save({"indices": get_indices(model), "clustered_here": list(counter.modules),
                "deepspeed_imported": "deepspeed" in sys.modules}, out / f"ddp_rank{rank}.pt")


def zero3(args: argparse.Namespace, out: Path, counter: ClusteringCounter) -> None:
    """Step 2: ZeRO-3, or with `--fail-rank` a failure injected on one rank."""
    import torch
    from peft import get_peft_model

    from idlora_trl import get_indices

    rank, world = init_deepspeed()  # reuses the process group if there is one
    from idlora_trl import skeleton

    # A window of copies per group of `world` modules (clustered before the next gathers); the DDP run above
    # held every copy in one window (the default budget): both must give the one-process indices.
    skeleton.COPY_BUDGET_BYTES = 1
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = json.loads(Path(CPU_CONFIG).read_text())
    ds_config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=world,
                     gradient_clipping=1.0)
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (turns zero.Init on in from_config)
    reference = make_llama(seed=0)
    model = AutoModelForCausalLM.from_config(reference.config)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert tuple(q.shape) == (0,) and hasattr(q, "ds_id"), "the model is not partitioned"
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        if rank == 0:
            model.load_state_dict(reference.state_dict())
    del reference
    if args.fail_rank is not None:
        with registered(FailOnRank(args.fail_rank, args.crash), name="test-fail"):
            start = time.perf_counter()
            try:
                get_peft_model(model, idlora_config())
            except Exception as error:
                (out / f"error_rank{rank}.txt").write_text(
                    f"{type(error).__name__}: {error}\nafter {time.perf_counter() - start:.2f} s\n")
                raise
        (out / f"no_error_rank{rank}.txt").write_text("get_peft_model returned")
        return
    q_proj = model.model.layers[0].self_attn.q_proj
    with registered(WeightContextProbe(keep=True), name="test-probe") as probe:
        model = get_peft_model(model, idlora_config())
    facts = {"indices": get_indices(model), "clustered_here": list(counter.modules),
             "still_partitioned": tuple(q.shape) == (0,), "contexts": probe.records, "gathered": probe.gathered}
    # 35 elements over 2 ranks: shards of 18, the last one padded. The partition's dtype comes from the config (bf16
    # on or off), as transformers' from_pretrained chooses it: DeepSpeed 0.19 ignores `zero.Init(dtype=...)` on a CPU
    # without mkldnn fp16 (test_distributed.py::test_zero3_partition_dtype_follows_the_config_on_any_cpu).
    for dtype in (torch.float32, torch.bfloat16):
        config = dict(ds_config, bf16={"enabled": dtype == torch.bfloat16})
        with deepspeed.zero.Init(config_dict_or_path=config):
            odd = torch.nn.Linear(7, 5, bias=False, dtype=dtype)
        assert tuple(odd.weight.shape) == (0,) and odd.weight.dtype == dtype
        with deepspeed.zero.GatheredParameters([odd.weight], modifier_rank=0), torch.no_grad():
            if rank == 0:
                odd.weight.copy_(torch.arange(35.0).view(5, 7))
        facts[f"odd_{str(dtype).removeprefix('torch.')}"] = gathered_by_owner(odd, world)
    with deepspeed.zero.GatheredParameters([q], modifier_rank=None):  # whole on every rank: no communication
        facts["available"] = gathered_by_owner(q_proj, world)
    torch.save(facts, out / f"zero3_rank{rank}.pt")


if __name__ == "__main__":
    main()
    shutdown()
