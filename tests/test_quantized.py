"""ID-LoRA on bitsandbytes 4-bit (nf4, fp4) and 8-bit bases, QLoRA-style, with real bitsandbytes on the CPU: the
rows clustered are those of the dequantized weight (the same indices as a float model holding those weights),
training moves only the adapter, and a saved adapter loads onto a fresh quantized base with the same outputs.
(Other quantization schemes are refused by name: tests/test_library_errors.py.)"""

import pytest
import torch
from helpers import dequantized, make_llama
from peft import PeftModel, get_peft_model

from idlora_trl import IDLoRAConfig, get_indices

# bitsandbytes lives in the Axolotl tier's venv (integrations/axolotl/ci.sh runs this file there): in the main venv
# its import prints Hub-kernel warnings into every PEFT process, which the one-line error tests would see.
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes: the Axolotl tier runs these tests")

KINDS = ["nf4", "fp4", "8bit"]
TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-for-bnb")
    make_llama(hidden=128).save_pretrained(folder)
    return folder


def quantized(model_dir, kind: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=True) if kind == "8bit" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="cpu",
                                                dtype=torch.float32)


def idlora() -> IDLoRAConfig:
    return IDLoRAConfig(r=8, num_clusters=2, target_modules=TARGETS, task_type="CAUSAL_LM")


@pytest.mark.parametrize("kind", KINDS)
def test_indices_are_those_of_the_dequantized_weights(model_dir, kind):
    model = quantized(model_dir, kind)
    packed = model.model.layers[0].mlp.gate_proj.weight
    assert type(packed).__name__ in ("Params4bit", "Int8Params")  # really quantized
    reference = make_llama(hidden=128)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                reference.get_submodule(name).weight.copy_(dequantized(module))
    expected = get_indices(get_peft_model(reference, idlora()))
    got = get_indices(get_peft_model(model, idlora()))
    assert got.keys() == expected.keys() and len(got) == 10
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_a_weight_bitsandbytes_repacked_for_the_cpu_is_clustered_as_computed(model_dir):
    """On a CPU with AVX512-BF16, a 4-bit layer's first eval-mode forward repacks its weight for bitsandbytes' CPU
    kernel (`packing_format_for_cpu`, scales rounded to bf16), after which the packed data no longer dequantizes
    directly. The rows clustered are then those the layer computes with: its output for the identity, less the
    bias (on other CPUs nothing is repacked and they are the dequantized weights)."""
    model = quantized(model_dir, "nf4").eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 97, (1, 6)))
        reference = make_llama(hidden=128)
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                packed = getattr(module.weight.quant_state, "packing_format_for_cpu", False)
                computed = module(torch.eye(module.in_features)).float().t() if packed else dequantized(module)
                reference.get_submodule(name).weight.copy_(computed)
    expected = get_indices(get_peft_model(reference, idlora()))
    got = get_indices(get_peft_model(model, idlora()))
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in expected)


@pytest.mark.parametrize("kind", KINDS)
def test_trains_saves_and_loads_on_a_quantized_base(model_dir, kind, tmp_path):
    model = get_peft_model(quantized(model_dir, kind), idlora())

    probe = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))

    def frozen_weights() -> dict:  # the quantized layers by what they compute: bitsandbytes may repack a weight
        weights = {n: p.detach().clone() for n, p in model.named_parameters()
                   if not p.requires_grad and type(p).__name__ not in ("Params4bit", "Int8Params")}
        with torch.no_grad():
            weights.update({f"{n} output": m(probe[:, :m.in_features]).clone()
                            for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")})
        return weights

    frozen = frozen_weights()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = frozen_weights()
    changed = [n for n in frozen if not torch.equal(after[n], frozen[n])]
    assert sum("output" in n for n in frozen) == 14 and not changed, changed
    model.eval()  # eval mode with gradients enabled: the layer's output is a view made under no_grad
    model(input_ids=ids, labels=ids).loss.backward()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(quantized(model_dir, kind), tmp_path)
    saved = {n: t for n, t in model.state_dict().items() if "idlora_" in n}
    restored = {n: t for n, t in loaded.state_dict().items() if "idlora_" in n}
    assert saved.keys() == restored.keys() and all(torch.equal(saved[n], restored[n]) for n in saved)
    with torch.no_grad():
        out = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            assert not torch.allclose(out, loaded(input_ids=ids).logits)  # the trained update is there
        if kind == "8bit":  # (a 4-bit base computes in another precision once bitsandbytes repacked it for the CPU)
            torch.testing.assert_close(out, model(input_ids=ids).logits)


def test_the_command_trains_on_a_4bit_base(tiny_model_dir, tmp_path, capsys):
    from idlora_trl_app.cli import main

    main(["sft", "--model_name_or_path", tiny_model_dir, "--load_in_4bit", "--bnb_4bit_quant_type", "nf4",
          "--idlora_r", "8", "--idlora_num_clusters", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1",
          "--max_steps", "3", "--max_train_samples", "12", "--eval_samples", "0", "--no_plot", "--learning_rate",
          "1e-2", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "step    3/3  loss" in out and (tmp_path / "adapter_model.safetensors").is_file()


def test_the_qlora_benchmark_section_measures_both_methods_on_a_4bit_base(tmp_path):
    """`python -m benchmarks --only qlora` at toy sizes (the main tier's smoke run has no bitsandbytes)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--only", "qlora", "--threads", "1",
                             "--out", str(tmp_path / "B.md")], cwd=root, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-3000:]
    doc = (tmp_path / "B.md").read_text()
    section = doc.split("## 7. QLoRA-style training cost (4-bit base)")[1].split("\n## ")[0]
    assert "layers `Linear4bit`" in section, section
    rows = re.findall(r"^\| (QLoRA|ID-LoRA) \| [\d,]+ \| [\d.]+ \| [\d.]+x \|", section, flags=re.M)
    assert rows == ["QLoRA", "ID-LoRA"], section
    assert "Training step of ID-LoRA / QLoRA, 4-bit base" in doc and "Training memory of ID-LoRA / QLoRA" in doc
