"""Bad input to the library (configs, target modules, weights, index files, adapters, quantization schemes): every
case named in the core issue ends in a clear error that names the module/value and the fix. (Bad input to the
command: test_cli_errors.py.)"""

import pytest
import torch
from helpers import make_llama
from peft import PeftModel, get_peft_model
from torch import nn

from idlora_trl import IDLoRAConfig, get_indices, save_indices
from idlora_trl.layer import IDLoRALayer


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, r"invalid r=0.*positive integer"),
    ({"num_clusters": -1}, r"invalid num_clusters=-1"),
    ({"rank_boost": 0}, r"invalid rank_boost=0"),
    ({"r": 6, "rank_boost": 4}, r"r must be divisible by rank_boost=4"),
    ({"r": 8, "min_cluster_size": 4}, r"min_cluster_size=4.*at least r=8"),
    ({"router": "softmax"}, r"invalid router='softmax'.*'token', 'static'"),
    ({"selection": "pmrc_q"}, r"invalid selection='pmrc_q'. Did you mean 'pmrc-qr'\?"),
    ({"distance": "manhattan"}, r"invalid distance='manhattan'"),
    ({"idlora_dropout": 1.0}, r"invalid idlora_dropout=1.0"),
    ({"bias": "all"}, r"invalid bias='all'.*bias='none'"),
    ({"init_router_std": 0.0}, r"invalid init_router_std"),
    ({"target_parameters": ["w"]}, r"target_modules instead"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IDLoRAConfig(**kwargs)


def test_too_many_rows_for_a_module_names_it():
    # k_proj of the tiny Llama has d_out = 32; 4 clusters of 16 rows need 64
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj'.*num_clusters \* r <= 32"):
        get_peft_model(make_llama(), IDLoRAConfig(r=16, num_clusters=4))


def test_min_cluster_size_too_large_for_a_module():
    with pytest.raises(ValueError, match=r"k_proj.*at least 20 rows"):
        get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, min_cluster_size=20))


def test_rank_boost_must_divide_d_out():
    model = nn.Sequential(nn.Linear(8, 15))
    with pytest.raises(ValueError, match=r"rank_boost=2 must divide d_out of module '0' \(d_out=15\)"):
        get_peft_model(model, IDLoRAConfig(r=2, num_clusters=2, target_modules=["0"]))


def test_no_target_module_matched():
    with pytest.raises(ValueError, match=r"not_a_module"):
        get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, target_modules=["not_a_module"]))


def test_unsupported_layer_type():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match=r"module '1' of type LayerNorm.*nn.Linear"):
        get_peft_model(model, IDLoRAConfig(r=2, num_clusters=2, target_modules=["0", "1"]))


def test_lm_head_and_embedding_targets_are_refused():
    with pytest.raises(ValueError, match=r"output layer 'lm_head'.*all-linear"):
        get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"embedding 'model.embed_tokens'.*modules_to_save"):
        get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, target_modules=["embed_tokens"]))


def test_non_finite_weights_name_the_module():
    model = make_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj'.*(non-finite|NaN|nan|inf)"):
        get_peft_model(model, IDLoRAConfig(r=8, num_clusters=2))


@pytest.fixture
def index_file(tmp_path):
    peft_model = get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, target_modules=["q_proj"]))
    path = tmp_path / "indices.safetensors"
    save_indices(path, get_indices(peft_model), peft_model.peft_config["default"].decomposition_spec())
    return path, get_indices(peft_model)


def test_missing_indices_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"index file .*nope.safetensors.*does not exist.*decompose"):
        get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, indices_path=str(tmp_path / "nope.safetensors")))


def test_indices_file_with_other_settings(index_file):
    path, _ = index_file
    with pytest.raises(ValueError, match=r"other settings \(seed: file 0 vs config 3\)"):
        get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, seed=3, indices_path=str(path)))


def test_indices_file_missing_a_module(index_file):
    path, _ = index_file
    with pytest.raises(ValueError, match=r"no entry for module 'model.layers.0.self_attn.v_proj'"):
        get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, indices_path=str(path),
                                                  target_modules=["q_proj", "v_proj"]))


def test_indices_file_for_another_model(tmp_path, index_file):
    _, indices = index_file
    bad = {name: t + 1000 for name, t in indices.items()}
    path = tmp_path / "other.safetensors"
    save_indices(path, bad, IDLoRAConfig(r=8, num_clusters=2).decomposition_spec())
    with pytest.raises(ValueError, match=r"q_proj.*outside this module's rows \[0, 64\).*another model"):
        get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, indices_path=str(path),
                                                  target_modules=["q_proj"]))


def test_not_an_index_file(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"not a readable safetensors file"):
        get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, indices_path=str(path)))


def test_forward_without_indices_is_a_clear_error(tmp_path):
    peft_model = get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path)
    # a restored config used without its checkpoint has no indices
    from idlora_trl import IDLoRAConfig as C
    restored = C.from_pretrained(tmp_path)
    fresh = get_peft_model(make_llama(), restored)
    with pytest.raises(RuntimeError, match=r"no skeleton-row indices.*idlora_trl.decompose"):
        fresh(torch.zeros(1, 3, dtype=torch.long))
    from idlora_trl import decompose
    decompose(fresh)
    fresh(torch.zeros(1, 3, dtype=torch.long))
    assert all(torch.equal(get_indices(fresh)[n], t) for n, t in get_indices(peft_model).items())


def test_mixed_adapter_batches_are_refused():
    peft_model = get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, target_modules=["q_proj"]))
    layer = next(m for m in peft_model.modules() if isinstance(m, IDLoRALayer))
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        layer(torch.zeros(1, 64), adapter_names=["default"])


def test_loading_into_a_mismatched_model_is_reported(tmp_path):
    peft_model = get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match=r"size mismatch.*idlora_B"):
        PeftModel.from_pretrained(make_llama(hidden=128), tmp_path)


@pytest.mark.parametrize("method", ["gptq", "awq", "hqq", "torchao"])
def test_other_quantization_schemes_are_refused_by_name(method):
    model = make_llama()
    model.config.quantization_config = {"quant_method": method}
    model.is_quantized = True
    with pytest.raises(ValueError, match=rf"does not support bases quantized with '{method}'.*bitsandbytes"):
        get_peft_model(model, IDLoRAConfig(r=8, num_clusters=2))


def test_a_gguf_checkpoint_is_accepted():
    """transformers dequantizes a GGUF checkpoint to float weights as it loads, and leaves the model marked "gguf"."""
    model = make_llama()
    model.config.quantization_config = {"quant_method": "gguf"}
    model.is_quantized = True
    assert len(get_indices(get_peft_model(model, IDLoRAConfig(r=8, num_clusters=2)))) == 14
