"""A saved ID-LoRA adapter is checked as it loads: a damaged or mismatched file fails in
`PeftModel.from_pretrained` / `load_adapter` with one error naming the file, the module and what is wrong (never a
silent zero update, an out-of-bounds gather in a later forward, or a forward error about the meta device)."""

import pytest
import torch
from helpers import make_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from idlora_trl import IDLoRAConfig, get_indices

Q = "base_model.model.model.layers.0.self_attn.q_proj"  # 64 rows in the tiny Llama


@pytest.fixture
def saved(tmp_path):
    """A trained-looking adapter (B != 0) of the tiny Llama, saved; returns (directory, its tensors)."""
    model = get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, init_weights=False,
                                                      target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path)
    return tmp_path, load_file(tmp_path / "adapter_model.safetensors")


def edited(folder, tensors: dict, **changes) -> None:
    """Rewrite the adapter file: a change maps a key to a tensor, or to None to remove it."""
    tensors = dict(tensors)
    for key, value in changes.items():
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    save_file(tensors, folder / "adapter_model.safetensors")


CASES = {  # name: (key -> new value, expected message)
    "indices +1000": (lambda t: {f"{Q}.idlora_indices": t[f"{Q}.idlora_indices"] + 1000},
                      r"the index table for module 'model.layers.0.self_attn.q_proj' holds values in \[10\d\d, "
                      r"10\d\d\], outside this module's rows \[0, 64\)"),
    "indices = d_out": (lambda t: {f"{Q}.idlora_indices": torch.full_like(t[f"{Q}.idlora_indices"], 64)},
                        r"q_proj' holds values in \[64, 64\], outside this module's rows \[0, 64\)"),
    "indices -5": (lambda t: {f"{Q}.idlora_indices": torch.full_like(t[f"{Q}.idlora_indices"], -5)},
                   r"q_proj' holds values in \[-5, -5\]"),
    "indices float": (lambda t: {f"{Q}.idlora_indices": t[f"{Q}.idlora_indices"].float()},
                      r"q_proj' has dtype torch.float32, not an integer type"),
    "indices shape": (lambda t: {f"{Q}.idlora_indices": t[f"{Q}.idlora_indices"][:, :4].contiguous()},
                      r"q_proj' has shape \(2, 4\), expected \[num_clusters, r\] = \[2, 8\]"),
    "no indices": (lambda t: {f"{Q}.idlora_indices": None},
                   r"has no index table for module 'model.layers.0.self_attn.q_proj'.*only B, T"),
    "no B": (lambda t: {f"{Q}.idlora_B.weight": None}, r"has no B for module 'model.layers.0.self_attn.q_proj'"),
    "no T": (lambda t: {f"{Q}.idlora_T.weight": None}, r"has no T \(the router\) for module"),
    "module left out": (lambda t: {key: None for key in t if ".layers.1." in key},
                        r"holds no tensors for 2 module\(s\) that adapter '\w+' adapts: "
                        r"'model.layers.1.self_attn.q_proj', 'model.layers.1.self_attn.v_proj'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_adapter_file_fails_at_load_naming_file_and_module(saved, case):
    folder, tensors = saved
    change, message = CASES[case]
    edited(folder, tensors, **change(tensors))
    path = str(folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"ID-LoRA adapter file '{path}'.*{message}"):
        PeftModel.from_pretrained(make_llama(), folder)
    base = get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=rf"ID-LoRA adapter file '{path}'.*{message}"):
        base.load_adapter(folder, adapter_name="second")
    base.set_adapter("second")  # what failed to load is never used silently
    with pytest.raises(RuntimeError, match=r"adapter 'second' on module .* failed to load"):
        base(input_ids=torch.randint(0, 97, (1, 4)))


def test_an_intact_adapter_loads_as_saved(saved):
    folder, tensors = saved
    model = PeftModel.from_pretrained(make_llama(), folder)
    indices = get_indices(model)
    assert indices.keys() == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                              "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert torch.equal(indices["model.layers.0.self_attn.q_proj"], tensors[f"{Q}.idlora_indices"])
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=ids).logits
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, plain)  # B != 0 was loaded: the update is there


def test_a_state_dict_without_the_adapter_leaves_it_alone(saved):
    """Loading only the base weights (or another adapter's tensors) is not a damaged file."""
    folder, _ = saved
    model = PeftModel.from_pretrained(make_llama(), folder)
    base_only = {k: v for k, v in model.state_dict().items() if "idlora_" not in k}
    model.load_state_dict(base_only, strict=False)
    model(input_ids=torch.randint(0, 97, (1, 4)))


def test_a_saved_adapter_says_it_needs_idlora_trl(saved):
    """The README.md saved with the adapter (PEFT's card plus our section, written once however often it is saved)
    names the method, its settings and the import; without the import PEFT stops with `KeyError: 'IDLORA'`, which
    the card says. Checked in a fresh interpreter that never imports idlora_trl."""
    import subprocess
    import sys

    folder, _ = saved
    PeftModel.from_pretrained(make_llama(), folder).save_pretrained(folder)  # a second save replaces the section
    card = (folder / "README.md").read_text()
    assert card.count("## ID-LoRA adapter") == 1 and "library_name: peft" in card
    assert "`r=8`, `num_clusters=2`" in card and "adapted modules: q_proj, v_proj." in card
    assert "pip install idlora-trl" in card and "import idlora_trl  # registers ID-LoRA with PEFT" in card
    assert "stops with `KeyError: 'IDLORA'`" in card
    code = ("import sys; from transformers import AutoModelForCausalLM, LlamaConfig; from peft import PeftModel\n"
            "model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size="
            "128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))\n"
            "try:\n    PeftModel.from_pretrained(model, sys.argv[1])\n"
            "except KeyError as error:\n    print(repr(error))")
    result = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)
    assert "idlora_trl" not in result.stderr and result.stdout.strip() == "KeyError('IDLORA')", result.stderr[-2000:]
