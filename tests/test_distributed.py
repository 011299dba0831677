"""ID-LoRA on several processes: DeepSpeed ZeRO-3 (SFT, DPO, resume), plain DDP, and a rank that fails.

The rank scripts live in tests/distributed/ and run under `torchrun --nproc_per_node 2` (DPO: two torchrun agents
meeting through the c10d rendezvous, as two nodes do) on CPU with gloo (OMP_NUM_THREADS=1, a free port per run,
DeepSpeed's shm-op build skipped, every run bounded by `timeout`).
They write what they saw; the tests here compare, and rebuild the trained model in this process.
(FSDP2: test_distributed_fsdp2.py; a model built before its ZeRO-3 config: test_distributed_zero3_dtype.py; the
`idlora-trl` command on two ranks: test_distributed_cli.py.)
"""

from __future__ import annotations

import copy
import importlib
import json
import os
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from helpers import make_gpt2, make_llama
from launch import free_port, torchrun
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from idlora_trl import IDLoRAConfig, get_indices
from idlora_trl.plugins import get_plugin_manager

MODULES = 14  # 2 layers x 7 projections


def idlora_config() -> IDLoRAConfig:  # the scripts use the same (tests/distributed/common.py)
    return IDLoRAConfig(r=8, num_clusters=2, task_type="CAUSAL_LM")


def ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def sft_run(workdir) -> Path:
    out = workdir / "sft"
    launch = torchrun("zero3_train.py", "sft", str(out), "--max-steps", "12", "--save-steps", "6", log=out)
    assert launch.returncode == 0, launch.tail()
    return out


@pytest.fixture(scope="module")
def dpo_run(workdir) -> Path:
    out = workdir / "dpo"
    launch = torchrun("zero3_train.py", "dpo", str(out), "--max-steps", "10", log=out, nodes=2)  # two "nodes"
    assert launch.returncode == 0, launch.tail()
    return out


@pytest.fixture(params=["sft", "dpo"])
def zero3_run(request) -> Path:
    return request.getfixturevalue(f"{request.param}_run")


def losses(facts: dict, key: str = "loss") -> list[float]:
    return [log[key] for log in facts["log_history"] if key in log and "train_runtime" not in log]


# ------------------------------------------------------------------------------------------ ZeRO-3 + TRL


def test_zero3_decomposition_gathers_each_weight_to_its_owner_only(zero3_run):
    for facts in ranks(zero3_run):
        assert "deepspeed" in facts["plugins"]  # registered by the entry point, not by the script
        assert facts["partitioned_at_creation"]
        contexts = facts["weight_contexts"]
        assert len(contexts) == MODULES  # every rank enters every module's context
        assert {c["context"] for c in contexts} == {"GatherToOwner"}
        assert all(c["shape_inside"] == [0] for c in contexts)  # `weight` itself is never gathered, on no rank
        mine = [c for c in contexts if c["owner"] == facts["rank"]]
        assert len(mine) == MODULES // 2
        assert all(c["returned"] == c["full_shape"] for c in mine)  # the owner gets the whole weight...
        assert all(c["returned"] is None and c["nbytes"] == 0 for c in contexts if c not in mine)  # others: nothing
        assert facts["peak_gathered_bytes"] == max(c["nbytes"] for c in contexts)  # never two at once
        assert facts["still_partitioned_after_decomposition"]
    first, second = ([(c["module"], c["owner"]) for c in facts["weight_contexts"]] for facts in ranks(zero3_run))
    assert first == second  # the same modules, in the same order, with the same owners


def test_zero3_indices_equal_on_both_ranks_and_to_one_process(zero3_run):
    first, second = ranks(zero3_run)
    assert first["indices_equal_across_ranks"] and second["indices_equal_across_ranks"]
    assert first["indices_hash"] == second["indices_hash"]
    indices = torch.load(zero3_run / "indices.pt")
    single = one_process_indices(base_model(zero3_run))
    assert indices.keys() == single.keys() and len(single) == MODULES
    assert all(torch.equal(indices[name], single[name]) for name in single)


def test_zero3_base_weights_stay_partitioned_during_training(zero3_run):
    for facts in ranks(zero3_run):
        checks = facts["partition_checks"]
        assert [c["step"] for c in checks] == list(range(1, facts["global_step"] + 1))
        assert all(c["layers"] == MODULES and c["base_partitioned"] and c["adapters_partitioned"] for c in checks)
        assert all(c["max_shard_fraction"] == 0.5 for c in checks)  # each rank holds half of every weight


def test_zero3_sft_loss_goes_down(sft_run):
    first, second = ranks(sft_run)
    loss = losses(first)
    assert len(loss) == 12 and loss == losses(second)
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.1, loss


def test_zero3_dpo_learns_preferences(dpo_run):
    facts = ranks(dpo_run)[0]
    loss, margins = losses(facts), losses(facts, "rewards/margins")
    assert len(loss) == 10
    assert loss[-1] < loss[0] - 0.02, loss
    assert margins[-1] > margins[0] + 0.04, margins
    assert losses(facts, "rewards/accuracies")[-1] >= 0.75


_ONE_PROCESS: dict[bytes, dict] = {}


def one_process_indices(model) -> dict:
    """The indices a plain single-process `get_peft_model` gives (cached by the weights' bytes)."""
    key = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    if key not in _ONE_PROCESS:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the ranks; k-means on tiny weights is 10x slower on 2 busy threads
        try:
            _ONE_PROCESS[key] = get_indices(get_peft_model(copy.deepcopy(model), idlora_config()))
        finally:
            torch.set_num_threads(threads)
    return _ONE_PROCESS[key]


def base_model(out: Path):
    """The run's base model, rebuilt in this process from the gathered weights."""
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out / "base"))
    model.load_state_dict(torch.load(out / "base" / "weights.pt"), strict=True)
    return model.eval()


def test_zero3_saved_adapter_loads_in_one_process_with_the_same_logits(zero3_run, clustering_counter):
    assert all(facts["logits_equal_across_ranks"] for facts in ranks(zero3_run))
    saved = load_file(zero3_run / "adapter" / "adapter_model.safetensors")
    assert sum(".idlora_indices" in key for key in saved) == MODULES  # the indices travel with the adapter
    reference = torch.load(zero3_run / "logits.pt")
    base = base_model(zero3_run)
    with torch.no_grad():  # a fresh adapter (B = 0) gives the base model's outputs
        before = base(input_ids=reference["input_ids"]).logits
    loaded = PeftModel.from_pretrained(base, zero3_run / "adapter").eval()
    assert clustering_counter.modules == []  # the indices come from the file, never from clustering again
    indices = torch.load(zero3_run / "indices.pt")
    assert all(torch.equal(t, indices[name]) for name, t in get_indices(loaded).items())
    with torch.no_grad():
        logits = loaded(input_ids=reference["input_ids"]).logits
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, reference["logits"], atol=1e-3)  # training changed the outputs


def test_zero3_resume_from_checkpoint_continues_training(sft_run, workdir):
    checkpoint = sft_run / "trainer" / "checkpoint-6"
    assert (checkpoint / "global_step6").is_dir()  # DeepSpeed's own checkpoint (optimizer partitions)
    out = workdir / "resumed"
    launch = torchrun("zero3_train.py", "sft", str(out), "--max-steps", "12", "--resume", str(checkpoint),
                      log=out)
    assert launch.returncode == 0, launch.tail()
    resumed, uninterrupted = ranks(out)[0], ranks(sft_run)[0]
    assert [c["step"] for c in resumed["partition_checks"]] == list(range(7, 13))  # steps 7..12 ran here
    assert resumed["global_step"] == 12
    assert losses(resumed)[6:] == pytest.approx(losses(uninterrupted)[6:], abs=1e-4)
    final, at_6 = (load_file(d / "adapter_model.safetensors") for d in (out / "adapter", checkpoint))
    expected = load_file(sft_run / "adapter" / "adapter_model.safetensors")
    assert final.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(final[k], at_6[k]) for k in expected if "idlora_B" in k)  # it did train on


# ------------------------------------------------------------------------------- plain get_peft_model


@pytest.fixture(scope="module")
def indices_run(workdir) -> Path:
    out = workdir / "indices"
    launch = torchrun("indices.py", str(out), log=out)
    assert launch.returncode == 0, launch.tail()
    return out


@pytest.mark.parametrize("kind", ["ddp", "zero3"])
def test_get_peft_model_on_two_ranks_matches_one_process(indices_run, kind):
    single = one_process_indices(make_llama(seed=0))
    runs = [torch.load(indices_run / f"{kind}_rank{r}.pt") for r in (0, 1)]
    for run in runs:
        assert run["indices"].keys() == single.keys() and len(single) == MODULES
        assert all(torch.equal(run["indices"][name], single[name]) for name in single)
    clustered = [set(run["clustered_here"]) for run in runs]
    assert len(clustered[0]) == len(clustered[1]) == MODULES // 2  # the work was split over the ranks
    assert clustered[0] | clustered[1] == set(single)
    if kind == "ddp":
        assert not any(run["deepspeed_imported"] for run in runs)  # the plugin imports DeepSpeed lazily
    else:
        assert all(run["still_partitioned"] for run in runs)


def test_zero3_weight_context_gathers_the_exact_weight_to_its_owner_only(indices_run):
    reference = make_llama(seed=0)  # the weights the ranks loaded into their partitioned model
    odd = torch.arange(35.0).view(5, 7)
    for rank in (0, 1):
        run = torch.load(indices_run / f"zero3_rank{rank}.pt")
        contexts = run["contexts"]
        assert len(contexts) == MODULES and {c["owner"] for c in contexts} == {0, 1}
        for c in contexts:  # no rank ever had the whole weight in `module.weight`: nothing was all-gathered
            assert c["status"] == "NOT_AVAILABLE" and c["shape_inside"] == [0]
            assert (c["returned"] is not None) == (c["owner"] == rank)  # the owner got a tensor, the other None
        assert run["gathered"].keys() == {c["module"] for c in contexts if c["owner"] == rank}
        for name, weight in run["gathered"].items():  # bit for bit the weight the model holds
            assert torch.equal(weight, reference.get_submodule(name).weight.detach()), name
        for dtype in (torch.float32, torch.bfloat16):  # a padded last shard, in both dtypes
            answers = run[f"odd_{str(dtype).removeprefix('torch.')}"]
            assert answers[1 - rank] is None
            assert answers[rank].dtype == dtype and torch.equal(answers[rank], odd.to(dtype))
        q = reference.model.layers[0].self_attn.q_proj.weight.detach()
        assert run["available"][1 - rank] is None and torch.equal(run["available"][rank], q)


@pytest.mark.parametrize("how", ["exception", "crash"])
def test_a_rank_failing_in_the_decomposition_fails_every_rank(workdir, how):
    out = workdir / f"fail-{how}"
    launch = torchrun("indices.py", str(out), "--fail-rank", "1", *(["--crash"] if how == "crash" else []),
                      log=out)
    # an error, not a hang ended by `timeout` (124, or 137 after its kill): no wall-clock bound of our own, which
    # a slow or busy machine could miss
    assert launch.returncode not in (0, 124, 137), launch.tail()
    assert not list(out.glob("no_error_rank*.txt"))
    if how == "exception":  # the core shares the error: both ranks raise it
        for rank in (0, 1):
            message = (out / f"error_rank{rank}.txt").read_text()
            assert "failed on rank 1: injected failure" in message, message
    else:  # rank 1 dies without a word: the launcher ends rank 0
        assert "exitcode" in launch.log


# ------------------------------------------------------------------------------- configs and one process


def test_configs_and_hostfile_are_valid():
    from deepspeed.launcher.runner import _parse_hostfile
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    folder = files("idlora_trl.integrations.deepspeed")
    for name, bf16 in (("zero3_cpu_fp32.json", False), ("zero3_bf16.json", True)):
        hf = HfTrainerDeepSpeedConfig(json.loads((folder / name).read_text()))
        assert hf.is_zero3()
        hf.fill_match("train_micro_batch_size_per_gpu", 2)
        hf.fill_match("gradient_accumulation_steps", 2)
        hf.fill_match("train_batch_size", 4)  # DeepSpeedConfig checks it against a world of one here
        hf.fill_match("gradient_clipping", 1.0)
        hf.fill_match("bf16.enabled", bf16)
        for key in ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                    "zero_optimization.stage3_param_persistence_threshold"):
            hf.fill_match(key, 4096)
        assert "auto" not in json.dumps(hf.config)
        config = DeepSpeedConfig(hf.config)
        assert config.zero_optimization_stage == 3 and config.bfloat16_config.enabled == bf16
        assert "optimizer" not in hf.config  # HF's AdamW: no JIT-built cpu_adam
    pool = _parse_hostfile((folder / "hostfile.example").read_text().splitlines())
    assert list(pool.values()) == [8, 8]


@pytest.fixture
def zero3_in_this_process(monkeypatch):
    """A world of one process with DeepSpeed initialised, torn down afterwards (env, process group, config)."""
    import deepspeed
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this pytest process")
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    saved_env, threads = dict(os.environ), torch.get_num_threads()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        if ds_comm.is_initialized():
            ds_comm.destroy_process_group()
        if dist.is_initialized():
            dist.destroy_process_group()
        for key in set(os.environ) - set(saved_env):  # whatever init_distributed added
            monkeypatch.delenv(key)


@pytest.mark.parametrize("maker,module,stored_shape,modules", [
    (make_llama, "model.layers.1.mlp.down_proj", (64, 128), MODULES),
    (make_gpt2, "transformer.h.1.mlp.c_fc", (64, 256), 8),  # Conv1D: stored as [d_in, d_out]
])
def test_zero3_in_one_process_gathers_for_a_plain_get_peft_model(zero3_in_this_process, maker, module, stored_shape,
                                                                  modules):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = json.loads((files("idlora_trl.integrations.deepspeed") / "zero3_cpu_fp32.json").read_text())
    ds_config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=1,
                     gradient_clipping=1.0)
    reference = maker(seed=0)
    single = one_process_indices(reference)
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (zero.Init in from_config)
    model = AutoModelForCausalLM.from_config(reference.config)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        model.load_state_dict(reference.state_dict())
    base = model.get_submodule(module)
    weight = base.weight
    assert tuple(weight.shape) == (0,) and tuple(weight.ds_shape) == stored_shape  # partitioned, world of one
    hook = get_plugin_manager().hook
    with hook.idlora_weight_context(module=base, module_name=module, owner_rank=0) as full:  # the shard is all
        assert torch.equal(full, reference.get_submodule(module).weight) and tuple(weight.shape) == (0,)
    peft_model = get_peft_model(model, idlora_config())
    assert tuple(weight.shape) == (0,)  # never gathered into `weight` by the decomposition
    indices = get_indices(peft_model)
    assert indices.keys() == single.keys() and len(single) == modules
    assert all(torch.equal(indices[name], single[name]) for name in single)


@pytest.mark.parametrize("fp16_supported", [True, False], ids=["cpu-with-mkldnn-fp16", "cpu-without-mkldnn-fp16"])
def test_zero3_partition_dtype_follows_the_config_on_any_cpu(zero3_in_this_process, monkeypatch, fp16_supported):
    """On a CPU without mkldnn fp16 (an AMD EPYC) DeepSpeed 0.19 turns `zero.Init(dtype=X)` into bf16 for every X
    (`dtype or fp16 if fp16_supported else bf16`). Nothing of ours passes a dtype: transformers' `from_pretrained`/
    `from_config` under a live `HfDeepSpeedConfig` passes the config alone, whose bf16 switch decides. Both kinds
    of CPU are simulated, so the test means the same on every machine."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from transformers.integrations import HfDeepSpeedConfig

    from idlora_trl.layer import idlora_layers

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: fp16_supported)
    # the simulated flag reaches DeepSpeed: with neither config nor dtype, Init takes the accelerator's half type
    assert deepspeed.zero.Init().dtype == (torch.float16 if fp16_supported else torch.bfloat16)
    base = json.loads((files("idlora_trl.integrations.deepspeed") / "zero3_cpu_fp32.json").read_text())
    base.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=1)
    for bf16, expected in ((False, torch.float32), (True, torch.bfloat16)):
        keep_alive = HfDeepSpeedConfig(dict(base, bf16={"enabled": bf16}))  # noqa: F841  (zero.Init in from_config)
        model = AutoModelForCausalLM.from_config(make_llama().config, dtype=torch.float32)
        dtypes = {p.ds_tensor.dtype for p in model.parameters()}
        assert all(hasattr(p, "ds_id") for p in model.parameters()) and dtypes == {expected}, (bf16, dtypes)
        model = get_peft_model(model, idlora_config())  # the adapter stays float32 on a bf16 base (precision.py)
        assert {p.dtype for _, layer in idlora_layers(model) for p in layer.idlora_B.parameters()} == {torch.float32}
        del keep_alive, model
