"""QLoRA-style ID-LoRA in Axolotl: `load_in_4bit: true` (or `load_in_8bit`) with `adapter: idlora`.

Axolotl builds a bitsandbytes config only for `adapter: qlora` / `lora`; the plugin's validation gives its loader
one through `model_kwargs`. A real `axolotl train` on the tiny model then clusters the dequantized 4-bit weights
(the same indices as a float model holding them), trains, and saves an adapter that loads onto a fresh 4-bit
base. Runs in the Axolotl tier (bitsandbytes and Axolotl live in its venv).
"""
# ruff: noqa: F811  (test functions take the fixtures imported from tests/axolotl/fixtures.py as arguments)

import os
import sys
from pathlib import Path

import pytest

for _key, _value in {"AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "WANDB_DISABLED": "true", "WANDB_MODE": "disabled"}.items():
    os.environ.setdefault(_key, _value)

pytest.importorskip("axolotl.integrations.base", reason="Axolotl tier: run `bash integrations/axolotl/ci.sh`")
pytest.importorskip("bitsandbytes", reason="Axolotl tier: run `bash integrations/axolotl/ci.sh`")

sys.path.insert(0, str(Path(__file__).parent / "axolotl"))

import tiny_axolotl as tiny  # noqa: E402
import torch  # noqa: E402
from fixtures import plugin_manager, train, validate, workspace  # noqa: E402,F401  (pytest fixtures: F811 below)
from helpers import dequantized  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from idlora_trl import IDLoRAConfig, get_indices  # noqa: E402

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32", "llm_int8_threshold": 6.0}


def test_load_in_4bit_gives_axolotls_loader_the_qlora_config(workspace, plugin_manager):
    cfg = validate(workspace, plugin_manager, load_in_4bit=True)
    assert cfg.load_in_4bit and cfg.adapter == "idlora"
    assert dict(cfg.overrides_of_model_kwargs)["quantization_config"] == NF4


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"load_in_8bit": True}, {"quant_method": "bitsandbytes", "load_in_8bit": True}),
    ({"load_in_4bit": True, "bf16": True}, {**NF4, "bnb_4bit_compute_dtype": "bfloat16"}),
    ({"load_in_4bit": True, "bnb_config_kwargs": {"bnb_4bit_quant_type": "fp4"}},
     {**NF4, "bnb_4bit_quant_type": "fp4"}),
])
def test_quantization_settings_follow_the_config(workspace, plugin_manager, overrides, expected):
    cfg = validate(workspace, plugin_manager, **overrides)
    assert dict(cfg.overrides_of_model_kwargs)["quantization_config"] == expected


def test_a_quantization_config_given_in_model_kwargs_is_kept(workspace, plugin_manager):
    mine = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}
    cfg = validate(workspace, plugin_manager, load_in_4bit=True, model_kwargs={"quantization_config": mine})
    assert dict(cfg.overrides_of_model_kwargs)["quantization_config"] == mine


def test_without_a_quantized_base_no_quantization_config_is_added(workspace, plugin_manager):
    cfg = validate(workspace, plugin_manager)
    assert not (cfg.overrides_of_model_kwargs or {}).get("quantization_config")


def quantized_base(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=BitsAndBytesConfig.from_dict(NF4),
                                                device_map="cpu", dtype=torch.float32)


def test_axolotl_train_with_load_in_4bit_clusters_the_dequantized_weights(workspace):
    root, model_dir = workspace
    out, _ = train(workspace, "qlora", tiny.base_config(model_dir, root / "qlora", load_in_4bit=True))
    base = quantized_base(model_dir)
    assert type(base.model.layers[0].mlp.gate_proj.weight).__name__ == "Params4bit"
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    float_indices = get_indices(get_peft_model(reference, IDLoRAConfig(r=8, num_clusters=2, task_type="CAUSAL_LM")))
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, module in base.named_modules():
            if type(module).__module__.startswith("bitsandbytes"):
                reference.get_submodule(name).weight.copy_(dequantized(module))
    expected = get_indices(get_peft_model(reference, IDLoRAConfig(r=8, num_clusters=2, task_type="CAUSAL_LM")))

    loaded = PeftModel.from_pretrained(base, out)
    got = get_indices(loaded)
    assert got.keys() == expected.keys() and len(got) == 14
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert any(not torch.equal(got[name], float_indices[name]) for name in got)  # the base really was 4-bit
    trained = [p for n, p in loaded.named_parameters() if "idlora_B" in n]
    assert trained and any(p.abs().max() > 0 for p in trained)  # B starts at zero: training moved it
