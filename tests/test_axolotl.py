"""The Axolotl plugin (`adapter: idlora`): real `axolotl train` runs for SFT and DPO on a tiny offline Llama,
and the plugin's validation and loading in process.

Needs Axolotl, which lives in its own venv: `bash integrations/axolotl/ci.sh` creates it (axolotl 0.19.0,
CPU torch 2.13.0) and runs this file. In the main venv the whole module is skipped.
"""
# ruff: noqa: F811  (test functions take the fixtures imported from tests/axolotl/fixtures.py as arguments)

import json
import os
import re
import sys
from pathlib import Path

import pytest

# Before Axolotl is imported: no telemetry, nothing from the Hub (the `axolotl train` subprocesses get the same).
for _key, _value in {"AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "WANDB_DISABLED": "true", "WANDB_MODE": "disabled"}.items():
    os.environ.setdefault(_key, _value)

# A submodule, not "axolotl": tests/axolotl/ (helpers, no __init__.py) would import as a namespace package.
pytest.importorskip("axolotl.integrations.base", reason="Axolotl tier: run `bash integrations/axolotl/ci.sh`")

sys.path.insert(0, str(Path(__file__).parent / "axolotl"))

import tiny_axolotl as tiny  # noqa: E402
from fixtures import plugin_manager, train, validate, workspace  # noqa: E402,F401  (pytest fixtures: F811 below)
import torch  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import idlora_trl  # noqa: E402  (registers ID-LoRA with PEFT)
import idlora_trl.skeleton  # noqa: E402
from idlora_trl import IDLoRAConfig, IDLoRALayer, get_indices  # noqa: E402

TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sft_run(workspace):
    """`examples/sft.yml` on the tiny model."""
    root, model_dir = workspace
    return train(workspace, "sft", tiny.example_config("sft.yml", model_dir, root / "sft", model_dir / "sft.jsonl"))


def load_base(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def sample_ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = [tiny.ALPACA.format(instruction="what is 3 plus 4?", output="it is 7.")] * 2
    return tokenizer(text, return_tensors="pt").input_ids


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def forbid_clustering(monkeypatch) -> None:
    """From now on any clustering fails the test: a saved adapter must bring its indices."""
    def fail(*args, **kwargs):
        raise AssertionError("ID-LoRA re-clustered while loading a saved adapter")

    monkeypatch.setattr(idlora_trl.skeleton, "decompose_layers", fail)


def check_adapter(out: Path, model_dir: Path) -> PeftModel:
    """The directory holds an ID-LoRA adapter that loads with PeftModel.from_pretrained and changes outputs."""
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IDLORA"
    assert (saved["r"], saved["num_clusters"], saved["rank_boost"], saved["router"]) == (8, 2, 2, "token")
    assert set(saved["target_modules"]) == TARGETS
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors and all("idlora_" in key for key in tensors)

    ids = sample_ids(model_dir)
    reference = logits(load_base(model_dir), ids)
    model = PeftModel.from_pretrained(load_base(model_dir), out).eval()
    layers = [m for m in model.modules() if isinstance(m, IDLoRALayer)]
    assert len(layers) == 2 * len(TARGETS)
    adapted = logits(model, ids)
    assert (adapted - reference).abs().max() > 1e-5, "the trained adapter does not change the model's outputs"
    with model.disable_adapter():
        assert torch.allclose(logits(model, ids), reference, atol=1e-6), "the base weights changed"
    return model


# ------------------------------------------------------------------------------------- real axolotl train


def test_sft_axolotl_train_with_torch_compile(workspace):
    """`torch_compile: true` (inductor): the adapted model compiles, trains, and saves an adapter that loads."""
    root, model_dir = workspace
    cfg = tiny.example_config("sft.yml", model_dir, root / "sft-compiled", model_dir / "sft.jsonl",
                              torch_compile=True, gradient_checkpointing=False)
    out, output = train(workspace, "sft-compiled", cfg)
    losses = [float(x) for x in re.findall(r"'loss': '?([\d.]+)", output)]
    assert len(losses) == 4, output[-3000:]
    check_adapter(out, model_dir)


def test_sft_axolotl_train_writes_an_idlora_adapter(sft_run, workspace, monkeypatch):
    out, output = sft_run
    _, model_dir = workspace
    assert "trainable params" in output and "'loss'" in output
    assert not (out / "model.safetensors").exists(), "SFT must save the adapter only"
    # The indices the Axolotl run computed are the clustering of the base weights with these settings.
    fresh = get_indices(get_peft_model(load_base(model_dir), IDLoRAConfig(
        r=8, num_clusters=2, rank_boost=2, target_modules=sorted(TARGETS), task_type="CAUSAL_LM")))
    forbid_clustering(monkeypatch)
    with pytest.raises(AssertionError, match="re-clustered"):  # the guard works
        get_peft_model(load_base(model_dir), IDLoRAConfig(r=8, num_clusters=2, task_type="CAUSAL_LM"))
    saved = get_indices(check_adapter(out, model_dir))
    assert fresh.keys() == saved.keys() and all(torch.equal(fresh[k], saved[k]) for k in fresh)


def test_dpo_axolotl_train_writes_an_idlora_adapter(workspace, monkeypatch):
    root, model_dir = workspace
    out, output = train(workspace, "dpo", tiny.example_config("dpo_safety.yml", model_dir, root / "dpo",
                                                              model_dir / "dpo_chat.jsonl"))
    margins = [float(m) for m in re.findall(r"'rewards/margins': '([^']+)'", output)]
    assert margins and margins[0] == 0.0, "a fresh adapter (B = 0) starts with zero margins against its reference"
    assert margins[-1] > 0
    forbid_clustering(monkeypatch)
    check_adapter(out, model_dir)


def test_dpo_continues_from_the_sft_adapter_without_reclustering(sft_run, workspace, monkeypatch):
    root, model_dir = workspace
    sft_out, _ = sft_run  # DPO in the plain "passthrough" data format this time
    out, output = train(workspace, "dpo_from_sft", tiny.base_config(
        model_dir, root / "dpo_from_sft", lora_model_dir=str(sft_out), **tiny.dpo_overrides(model_dir)))
    assert "loaded the adapter in" in output
    margins = [float(m) for m in re.findall(r"'rewards/margins': '([^']+)'", output)]
    assert margins and margins[0] != 0.0, "DPO did not start from the SFT adapter (its first margin is 0)"
    forbid_clustering(monkeypatch)
    dpo = check_adapter(out, model_dir)
    sft = PeftModel.from_pretrained(load_base(model_dir), sft_out)
    a, b = get_indices(sft), get_indices(dpo)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sft_B = {k: v for k, v in load_file(sft_out / "adapter_model.safetensors").items() if "idlora_B" in k}
    dpo_B = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if "idlora_B" in k}
    assert sft_B.keys() == dpo_B.keys() and any(not torch.equal(sft_B[k], dpo_B[k]) for k in sft_B)


# ------------------------------------------------------------------------------------- validation, in process


@pytest.mark.parametrize("name", ["sft.yml", "dpo_safety.yml", "sft_zero3.yml"])
def test_examples_validate(name, plugin_manager, monkeypatch):
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    monkeypatch.chdir(tiny.EXAMPLES.parents[2])  # the repository root: the DeepSpeed path is relative to it
    cfg = DictDefault(tiny.load_example(name))
    prepare_plugins(cfg)
    cfg = validate_config(cfg)
    assert cfg.adapter == "idlora" and cfg.lora_r == 128 and cfg.idlora.k == 4
    if name == "sft_zero3.yml":
        assert cfg.deepspeed == "integrations/deepspeed/zero3_bf16.json"
        assert json.loads(Path(cfg.deepspeed).read_text())["zero_optimization"]["stage"] == 3


def test_valid_config_keeps_the_idlora_block_and_rl_adapter_ref_model(workspace, plugin_manager):
    cfg = validate(workspace, plugin_manager, idlora={"num_clusters": 2, "router": "static"},
                   rl_adapter_ref_model=True)
    assert cfg.adapter == "idlora"
    assert (cfg.idlora.k, cfg.idlora["num_clusters"], cfg.idlora.router, cfg.idlora.rank_boost) == (2, 2, "static", 2)
    assert cfg.rl_adapter_ref_model is True  # no Axolotl schema declares it; the plugin does


def test_the_paper_preset_is_one_key(workspace, plugin_manager):
    from idlora_trl.integrations.axolotl.args import build_config

    cfg = validate(workspace, plugin_manager, lora_alpha=None, idlora={"preset": "paper"})  # s = 1: the paper's
    config = build_config(cfg.get)
    assert (config.preset, config.router, config.router_norm, config.selection, config.num_clusters,
            config.rank_boost, config.scaling) == ("paper", "token", "none", "pmrc", 4, 2, 1.0)


def test_missing_idlora_block_gets_the_defaults(workspace, plugin_manager):
    cfg = validate(workspace, plugin_manager, idlora=None)
    assert (cfg.idlora.k, cfg.idlora.rank_boost, cfg.idlora.selection) == (4, 2, "pmrc")


def test_without_the_plugin_idlora_is_unknown(workspace, plugin_manager):
    with pytest.raises(ValueError, match="not built in and was not registered"):
        validate(workspace, plugin_manager, plugins=None)


@pytest.mark.parametrize(("block", "message"), [
    ({"k": 2, "kk": 3}, r"idlora: unknown key\(s\) \['kk'\]"),
    ({"k": 0}, "invalid num_clusters=0"),
    ({"k": 2, "num_clusters": 3}, "k=2 and num_clusters=3 disagree"),
    ({"router": "dynamic"}, "'token' or 'static'"),
    ({"rank_boost": 3}, "r must be divisible by rank_boost=3"),
    ({"selection": "nope"}, "invalid selection='nope'"),
    ({"min_cluster_size": 4}, "min_cluster_size"),
    ({"init_router_std": -1.0}, "invalid init_router_std=-1.0"),
    ({"distance": "manhattan"}, "'euclidean' or 'cosine'"),
    ({"router_norm": "softmax"}, "'none' or 'rms'"),
    ({"selection": "pmrc_qr"}, "Did you mean 'pmrc-qr'"),
    ({"preset": "paper", "router_norm": "rms"}, "invalid router_norm='rms' with preset='paper'"),
    ({"preset": "papers"}, "preset"),
], ids=["unknown-key", "k-zero", "k-vs-num_clusters", "router", "rank-boost", "selection", "min-cluster-size",
        "router-std", "distance", "router-norm", "selection-typo", "preset-conflict", "preset-name"])
def test_bad_idlora_block_is_a_clear_error(workspace, plugin_manager, block, message):
    with pytest.raises(ValueError, match=message):
        validate(workspace, plugin_manager, idlora=block)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"load_in_4bit": True, "load_in_8bit": True}, "load_in_4bit and load_in_8bit are both set"),
    ({"gptq": True}, "gptq: GPTQ-quantized base models are not supported"),
    ({"merge_lora": True}, "token router's update depends on each token"),
    ({"merge_lora": True, "idlora": {"router": "static"}}, "needs merge_method: legacy"),
    ({"relora": True, "jagged_restart_steps": 2}, "relora: ReLoRA"),
    ({"lora_r": None}, "lora_r is required"),
    ({"peft_use_dora": True}, "peft_use_dora: a LoRA-only option"),
    ({"lora_target_parameters": ["mlp.experts"]}, "lora_target_parameters: a LoRA-only option"),
], ids=["4bit-and-8bit", "gptq", "merge-token-router", "merge-static-efficient", "relora", "no-lora_r", "dora",
        "target-parameters"])
def test_unsupported_settings_are_clear_errors(workspace, plugin_manager, overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(workspace, plugin_manager, **overrides)


def test_static_router_may_merge_with_the_legacy_method(workspace, plugin_manager):
    cfg = validate(workspace, plugin_manager, merge_lora=True, merge_method="legacy", idlora={"router": "static"})
    assert cfg.merge_lora and cfg.idlora.router == "static"


def test_other_adapters_are_left_alone(workspace, plugin_manager):
    from axolotl.utils.dict import DictDefault

    from idlora_trl.integrations.axolotl import IDLoRAPlugin

    _, model_dir = workspace
    cfg = validate(workspace, plugin_manager, adapter="lora", idlora=None)
    assert cfg.adapter == "lora" and "idlora" not in cfg
    plugin, model = IDLoRAPlugin(), load_base(model_dir)
    assert plugin.load_adapter(model, cfg) is None
    assert plugin.load_adapter(model, cfg, config_only=True) is None
    assert plugin.load_adapter(model, DictDefault({"base_model": str(model_dir)})) is None
    plugin.post_trainer_create(cfg, trainer=None)  # nothing to do, nothing touched
    assert not any(isinstance(m, IDLoRALayer) for m in model.modules())


# ------------------------------------------------------------------------------------- loading, in process


def test_config_only_returns_the_config_and_does_not_inject(workspace, plugin_manager):
    from axolotl.loaders.adapter import load_adapter

    _, model_dir = workspace
    cfg = validate(workspace, plugin_manager, rl="dpo", **{k: v for k, v in tiny.dpo_overrides(model_dir).items()
                                                           if k != "rl"})
    model = load_base(model_dir)
    returned, config = load_adapter(model, cfg, "idlora", config_only=True)  # Axolotl's own dispatch
    assert returned is None and isinstance(config, IDLoRAConfig)
    assert (config.r, config.num_clusters, config.idlora_alpha, config.task_type) == (8, 2, 16, "CAUSAL_LM")
    assert set(config.target_modules) == TARGETS
    assert not any(isinstance(m, IDLoRALayer) for m in model.modules())


def test_load_adapter_builds_a_peft_model(workspace, plugin_manager):
    from axolotl.loaders.adapter import load_adapter

    _, model_dir = workspace
    cfg = validate(workspace, plugin_manager, lora_target_linear=None, lora_target_modules=["q_proj", "v_proj"])
    model, config = load_adapter(load_base(model_dir), cfg, "idlora")
    assert isinstance(model, PeftModel) and model.peft_config["default"] is config
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("idlora_" in name for name in trainable)
    assert len([m for m in model.modules() if isinstance(m, IDLoRALayer)]) == 4


def saved_adapter(directory: Path, model_dir: Path):
    """A saved ID-LoRA adapter with non-zero B, and the logits it gives."""
    model = get_peft_model(load_base(model_dir), IDLoRAConfig(r=8, num_clusters=2, task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "idlora_B" in name:
                p.normal_(std=0.1)
    model.save_pretrained(directory)
    return logits(model.eval(), sample_ids(model_dir)), get_indices(model)


def test_lora_model_dir_reloads_without_reclustering(workspace, plugin_manager, tmp_path, monkeypatch):
    from axolotl.loaders.adapter import load_adapter

    _, model_dir = workspace
    expected, indices = saved_adapter(tmp_path / "adapter", model_dir)
    forbid_clustering(monkeypatch)
    cfg = validate(workspace, plugin_manager, lora_model_dir=str(tmp_path / "adapter"))
    model, config = load_adapter(load_base(model_dir), cfg, "idlora")
    assert isinstance(model, PeftModel) and isinstance(config, IDLoRAConfig) and not config.inference_mode
    assert any(p.requires_grad for n, p in model.named_parameters() if "idlora_B" in n)  # is_trainable
    assert torch.allclose(logits(model.eval(), sample_ids(model_dir)), expected, atol=1e-6)
    loaded = get_indices(model)
    assert all(torch.equal(loaded[k], indices[k]) for k in indices)


def test_dpo_from_lora_model_dir_passes_the_saved_config_and_loads_weights_later(
        workspace, plugin_manager, tmp_path, monkeypatch):
    """The in-process version of what `axolotl train` does for DPO with lora_model_dir."""
    from idlora_trl.integrations.axolotl import IDLoRAPlugin
    from idlora_trl.integrations.axolotl.plugin import load_saved_weights

    _, model_dir = workspace
    expected, _ = saved_adapter(tmp_path / "adapter", model_dir)
    forbid_clustering(monkeypatch)
    cfg = validate(workspace, plugin_manager, lora_model_dir=str(tmp_path / "adapter"), **tiny.dpo_overrides(model_dir))
    plugin = IDLoRAPlugin()
    returned, config = plugin.load_adapter(load_base(model_dir), cfg, config_only=True)
    assert returned is None and isinstance(config, IDLoRAConfig) and not config.inference_mode
    wrapped = get_peft_model(load_base(model_dir), config)  # what TRL does with peft_config: no clustering
    load_saved_weights(wrapped, str(tmp_path / "adapter"))
    assert torch.allclose(logits(wrapped.eval(), sample_ids(model_dir)), expected, atol=1e-6)



# ------------------------------------------------------------------------------------- merging (axolotl merge-lora)


def test_merge_lora_merges_a_static_router_adapter(workspace, plugin_manager, tmp_path):
    """`axolotl merge-lora` (in process) with `router: static` and `merge_method: legacy`: the merged model gives
    the adapter's outputs."""
    from axolotl.cli.merge_lora import do_cli

    root, model_dir = workspace
    model = get_peft_model(load_base(model_dir), IDLoRAConfig(r=8, num_clusters=2, router="static",
                                                              target_modules=sorted(TARGETS), task_type="CAUSAL_LM"))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "idlora_" in name:
                p.normal_(std=0.1)
    model.save_pretrained(tmp_path / "adapter")
    ids = sample_ids(model_dir)
    expected = logits(model.eval(), ids)
    cfg = tiny.base_config(model_dir, tmp_path, lora_model_dir=str(tmp_path / "adapter"), merge_method="legacy",
                           idlora={"k": 2, "router": "static"})
    do_cli(config=str(tiny.write_config(tmp_path / "merge.yml", cfg)))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged", dtype=torch.float32).eval()
    assert not any("idlora" in name for name, _ in merged.named_parameters())
    assert torch.allclose(logits(merged, ids), expected, atol=1e-4)


def test_merge_lora_refuses_the_token_router(workspace, plugin_manager, tmp_path):
    from axolotl.cli.merge_lora import do_cli

    _, model_dir = workspace
    cfg = tiny.base_config(model_dir, tmp_path, lora_model_dir=str(tmp_path), merge_method="legacy")
    with pytest.raises(ValueError, match="cannot be merged"):
        do_cli(config=str(tiny.write_config(tmp_path / "merge.yml", cfg)))
