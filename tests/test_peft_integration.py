"""ID-LoRA through PEFT's public API, as LoRA is used: save/load, Auto classes, adapters, disabling."""

import json

import pytest
import torch
from helpers import make_llama, reference_forward
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import idlora_trl
from idlora_trl import IDLoRAConfig, IDLoRAModel, get_indices
from idlora_trl.layer import IDLoRALayer


def trained_adapter(seed=0, **overrides):
    """A tiny Llama with an ID-LoRA adapter whose B and T are non-trivial."""
    model = make_llama(seed)
    config = IDLoRAConfig(**{"r": 8, "num_clusters": 2, "init_weights": False, **overrides})
    return get_peft_model(model, config)


def test_registration_is_idempotent_and_uses_the_saved_type():
    idlora_trl.register_with_peft()
    idlora_trl.register_with_peft()
    assert PEFT_TYPE_TO_TUNER_MAPPING["IDLORA"] is IDLoRAModel
    assert PEFT_TYPE_TO_CONFIG_MAPPING["IDLORA"] is IDLoRAConfig


def test_save_load_is_bit_exact_and_never_clusters(tmp_path, tokens, clustering_counter):
    peft_model = trained_adapter()
    assert len(clustering_counter.modules) == 14  # 7 projections x 2 layers
    expected = peft_model(tokens).logits
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IDLORA" and saved["num_clusters"] == 2
    indices = get_indices(peft_model)

    loaded = PeftModel.from_pretrained(make_llama(0), tmp_path)
    assert isinstance(loaded.peft_config["default"], IDLoRAConfig)
    assert torch.equal(loaded(tokens).logits, expected)
    assert len(clustering_counter.modules) == 14
    assert all(torch.equal(indices[n], t) for n, t in get_indices(loaded).items())


def test_auto_peft_model_loads_from_a_local_base(tmp_path, tokens, clustering_counter):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_llama(3).save_pretrained(base_dir)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                IDLoRAConfig(r=8, num_clusters=2, init_weights=False))
    calls = len(clustering_counter.modules)
    expected = peft_model(tokens).logits
    peft_model.save_pretrained(adapter_dir)
    assert isinstance(PeftConfig.from_pretrained(adapter_dir), IDLoRAConfig)
    loaded = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    assert torch.equal(loaded(tokens).logits, expected)
    assert len(clustering_counter.modules) == calls


def test_load_adapter_as_trainable_second_adapter(tmp_path, tokens, clustering_counter):
    first = trained_adapter(seed=0)
    second = trained_adapter(seed=0, r=4)
    calls = len(clustering_counter.modules)
    first_logits = first(tokens).logits
    second.save_pretrained(tmp_path / "r4")
    first.load_adapter(tmp_path / "r4", adapter_name="r4", is_trainable=True)
    first.set_adapter("r4")
    assert torch.equal(first(tokens).logits, second(tokens).logits)
    assert any(p.requires_grad for n, p in first.named_parameters() if ".r4." in n)
    first.set_adapter("default")
    assert torch.equal(first(tokens).logits, first_logits)
    assert len(clustering_counter.modules) == calls


def test_disable_adapter_gives_base_logits_exactly(tokens):
    base_logits = make_llama(0)(tokens).logits
    peft_model = trained_adapter()
    adapted = peft_model(tokens).logits
    assert not torch.allclose(adapted, base_logits)
    with peft_model.disable_adapter():
        assert torch.equal(peft_model(tokens).logits, base_logits)
    assert torch.equal(peft_model(tokens).logits, adapted)


def test_second_adapter_with_same_settings_reuses_indices(tokens, clustering_counter):
    peft_model = trained_adapter()
    calls = len(clustering_counter.modules)
    # same decomposition settings, other training settings: the indices are reused, nothing is clustered
    peft_model.add_adapter("second", IDLoRAConfig(r=8, num_clusters=2, rank_boost=1, router="static"))
    assert len(clustering_counter.modules) == calls
    first, second = get_indices(peft_model, "default"), get_indices(peft_model, "second")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)
    # the copy is independent: changing one table leaves the other alone
    layer = next(m for m in peft_model.modules() if isinstance(m, IDLoRALayer))
    assert layer.idlora_indices["second"].data_ptr() != layer.idlora_indices["default"].data_ptr()


def test_second_adapter_with_other_settings_clusters_again():
    peft_model = trained_adapter()
    peft_model.add_adapter("other", IDLoRAConfig(r=8, num_clusters=2, selection="sequential"))
    seq = get_indices(peft_model, "other")
    assert any(not torch.equal(seq[n], t) for n, t in get_indices(peft_model).items())
    # the sequential rule: the first r rows of each of k contiguous row blocks
    name = "model.layers.0.self_attn.q_proj"
    assert seq[name].tolist() == [list(range(8)), list(range(32, 40))]


def test_set_and_delete_adapters(tokens):
    peft_model = trained_adapter()
    default_logits = peft_model(tokens).logits
    peft_model.add_adapter("other", IDLoRAConfig(r=8, num_clusters=2, init_weights=False, seed=5))
    peft_model.set_adapter("other")
    other_logits = peft_model(tokens).logits
    assert not torch.allclose(other_logits, default_logits)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if ".default." in n)
    peft_model.delete_adapter("other")
    peft_model.set_adapter("default")
    assert "other" not in peft_model.peft_config
    assert not any(".other" in n for n in peft_model.state_dict())
    assert torch.equal(peft_model(tokens).logits, default_logits)


def test_two_active_adapters_each_read_the_base_output(tokens):
    peft_model = trained_adapter(target_modules=["q_proj"])
    peft_model.add_adapter("other", IDLoRAConfig(r=8, num_clusters=2, init_weights=False, seed=5,
                                                 target_modules=["q_proj"]))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    h = torch.randn(3, 64)
    layer.set_adapter(["default", "other"])
    both = layer(h)
    # independent of the layer's own update code: the dense float64 reference of Eq. 3/4, once per adapter
    expected = reference_forward(layer, ["default", "other"], h)
    torch.testing.assert_close(both.double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, reference_forward(layer, ["default"], h))


def test_print_trainable_parameters_matches_the_formula(capsys):
    peft_model = trained_adapter(r=8, num_clusters=2, rank_boost=2)
    trainable, total = peft_model.get_nb_trainable_parameters()
    layers = [m for m in peft_model.modules() if isinstance(m, IDLoRALayer)]
    assert trainable == sum(m.out_features * 8 // 4 + 8 for m in layers)
    count = idlora_trl.count_parameters(peft_model)
    assert count.idlora == trainable and count.base + trainable == total
    peft_model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


def test_indices_file_round_trip(tmp_path, clustering_counter):
    peft_model = trained_adapter(seed=0)
    calls = len(clustering_counter.modules)
    path = tmp_path / "indices.safetensors"
    idlora_trl.save_indices(path, get_indices(peft_model), peft_model.peft_config["default"].decomposition_spec())
    again = get_peft_model(make_llama(0), IDLoRAConfig(r=8, num_clusters=2, indices_path=str(path)))
    assert all(torch.equal(get_indices(peft_model)[n], t) for n, t in get_indices(again).items())
    assert len(clustering_counter.modules) == calls


def test_transformers_adapter_methods_work_where_the_versions_allow(tmp_path):
    """transformers' own adapter methods on a plain model (`add_adapter`, `set_adapter`, `active_adapters`,
    `disable_adapters`/`enable_adapters`, `load_adapter`) need the PEFT version transformers names as its minimum:
    with Axolotl's pins (transformers 5.16, peft 0.20) they work with ID-LoRA, equal to PEFT's own loader; with
    transformers 5.25 and the newest PEFT (0.21.2) transformers refuses them for every PEFT method until PEFT 0.22
    is released, as the README says. This test runs in both tiers and checks whichever holds."""
    from importlib.metadata import version

    from packaging.version import Version
    from transformers.integrations.peft import MIN_PEFT_VERSION

    model = make_llama()
    config = IDLoRAConfig(r=8, num_clusters=2, init_weights=False, target_modules=["q_proj", "v_proj"])
    if Version(version("peft")) < Version(MIN_PEFT_VERSION):
        with pytest.raises(ValueError, match=f"version >= {MIN_PEFT_VERSION}"):
            model.add_adapter(config, adapter_name="a")
        return
    model.add_adapter(config, adapter_name="a")
    assert model.active_adapters() == ["a"]
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        model.disable_adapters()
        assert not torch.allclose(model(input_ids=ids).logits, adapted)
        model.enable_adapters()
        torch.testing.assert_close(model(input_ids=ids).logits, adapted)
    get_peft_model(make_llama(), config).save_pretrained(tmp_path)
    plain = make_llama()
    plain.load_adapter(str(tmp_path), adapter_name="loaded")
    plain.set_adapter("loaded")
    reference = PeftModel.from_pretrained(make_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, reference(input_ids=ids).logits)
