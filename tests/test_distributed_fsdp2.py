"""ID-LoRA under torch's FSDP2 (`fully_shard`, 2 gloo ranks) trains as one process does, what it saves loads in
one process, and a trainer asked for FSDP on a CPU says that accelerate runs DDP instead
(tests/distributed/fsdp2_train.py runs the ranks; docs/DISTRIBUTED.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import VOCAB, make_llama
from launch import torchrun
from peft import PeftModel


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    launch = torchrun("fsdp2_train.py", str(out), log=out)
    assert launch.returncode == 0, launch.tail()
    return out


def ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def test_fsdp2_starts_both_ranks_from_the_same_adapter(fsdp2_run):
    """FSDP2 shards each rank's own copy (nothing is broadcast): indices, `B` and `T` must agree at the start."""
    first, second = ranks(fsdp2_run)
    assert first["start"].keys() == second["start"].keys()
    assert any("idlora_T" in name for name in first["start"]) and any("indices" in n for n in first["start"])
    assert all(torch.equal(first["start"][n], second["start"][n]) for n in first["start"])
    assert first["indices"].keys() == second["indices"].keys()
    assert all(torch.equal(first["indices"][n], second["indices"][n]) for n in first["indices"])


def test_fsdp2_trains_like_one_process(fsdp2_run):
    first, second = ranks(fsdp2_run)
    assert first["B_is_dtensor"], "the adapter was not sharded: fully_shard did not wrap it"
    assert not torch.equal(first["losses"], second["losses"])  # each rank saw its own rows
    reference = first["reference_losses"]
    assert reference[-1] < reference[0]  # the reference learns: the comparison means something
    torch.testing.assert_close(first["mean_losses"], reference, rtol=0, atol=1e-5)
    for run in (first, second):
        for name, value in run["reference_final"].items():
            torch.testing.assert_close(run["final"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    moved = [name for name in first["start"] if "idlora_B" in name
             and not torch.equal(first["final"][name], first["start"][name])]
    assert moved, "training under FSDP2 left B unchanged"


def test_fsdp2_saved_adapter_loads_in_one_process(fsdp2_run):
    """Saved by rank 0 from the full state dict: the loaded adapter has the trained state and its logits."""
    loaded = PeftModel.from_pretrained(make_llama(seed=0), fsdp2_run / "adapter").eval()
    trained = ranks(fsdp2_run)[0]["final"]
    state = {name.replace(".default", ""): value for name, value in loaded.state_dict().items() if "idlora_" in name}
    assert state.keys() == {name.replace(".default", "") for name in trained}
    for name, value in trained.items():
        torch.testing.assert_close(state[name.replace(".default", "")], value, rtol=0, atol=0, msg=name)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = loaded(input_ids=tokens).logits
        with loaded.disable_adapter():
            base = loaded(input_ids=tokens).logits
    assert not torch.allclose(adapted, base)  # the trained update is there


def test_a_trainer_asked_for_fsdp_on_a_cpu_says_it_runs_ddp(fsdp2_run):
    for run in ranks(fsdp2_run):
        assert run["trainer_distributed_type"] == "MULTI_CPU" and not run["trainer_fsdp_enabled"]
        said = [m for m in run["trainer_warnings"] if m.startswith("FSDP was asked for")]
        assert len(said) == 1 and "fully_shard" in said[0] and "MULTI_CPU" in said[0], run["trainer_warnings"]


def test_an_adapter_added_after_fully_shard_is_refused_with_what_to_do(fsdp2_run):
    for run in ranks(fsdp2_run):
        message = run["sharded_first"]
        assert message.startswith("ID-LoRA could not copy the weight of module 'model.layers.0."), message
        assert "DTensor" in message and "before sharding" in message and "docs/DISTRIBUTED.md" in message
