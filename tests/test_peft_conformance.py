"""PEFT conformance: every generic behaviour PEFT's own test suite exercises for a method, for both routers, on
`nn.Linear` (tiny Llama) and transformers' `Conv1D` (tiny GPT-2), with non-zero biases throughout.

Precision (fp16/bf16 bases, `.to(bf16)`, `torch.autocast`) is in `test_precision.py`.
"""

import pytest
import torch
from helpers import make_gpt2, make_llama, reference_forward, set_nonzero_biases
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

from idlora_trl import IDLoRAConfig, get_indices
from idlora_trl.layer import IDLoRALayer

ROUTERS = ["token", "static"]
MODELS = {"linear": make_llama, "conv1d": make_gpt2}
# per model: modules to adapt, a module for modules_to_save, the embedding for trainable tokens
TARGETS = {"linear": (["q_proj", "v_proj", "up_proj"], "model.norm", "embed_tokens"),
           "conv1d": (["c_attn", "c_fc"], "transformer.ln_f", "wte")}


def base(kind, seed=0):
    model = make_llama(seed, bias=True) if kind == "linear" else make_gpt2(seed)
    return set_nonzero_biases(model, seed=seed)


def config(kind, router, **overrides):
    return IDLoRAConfig(**{"r": 8, "num_clusters": 2, "router": router, "init_weights": False,
                           "target_modules": TARGETS[kind][0], **overrides})


def layers(model):
    return [m for m in model.modules() if isinstance(m, IDLoRALayer)]


def trained(kind, router, seed=0, **overrides):
    """A PeftModel whose B and T (static router included) are away from their initial values."""
    peft_model = get_peft_model(base(kind), config(kind, router, **overrides))
    with torch.no_grad():
        for layer in layers(peft_model):
            for name in layer.idlora_T:
                layer.idlora_T[name].weight.normal_(generator=torch.Generator().manual_seed(seed))
    return peft_model


def base_logits(kind, tokens):
    return base(kind)(tokens).logits


def test_models_cover_linear_and_conv1d_with_non_zero_biases():
    for kind, layer_type in (("linear", torch.nn.Linear), ("conv1d", Conv1D)):
        found = layers(trained(kind, "token"))
        assert found and all(isinstance(m.get_base_layer(), layer_type) for m in found)
        assert all(m.get_base_layer().bias.abs().min() > 0 for m in found)


# ------------------------------------------------------------------------------------ save and load
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("variant", ["safetensors", "pickle", "low_cpu_mem_usage"])
def test_save_load_round_trip(kind, router, variant, tmp_path, tokens):
    peft_model = trained(kind, router)
    expected = peft_model(tokens).logits
    peft_model.save_pretrained(tmp_path, safe_serialization=variant != "pickle")
    saved = tmp_path / ("adapter_model.bin" if variant == "pickle" else "adapter_model.safetensors")
    assert saved.is_file()
    state = torch.load(saved, weights_only=True) if variant == "pickle" else load_file(saved)
    # state-dict keys: B, T and the index table of each module, named as PEFT names them, no base weights
    modules = [name for name, module in peft_model.base_model.model.named_modules() if isinstance(module, IDLoRALayer)]
    assert set(state) == {f"base_model.model.{name}.{suffix}" for name in modules
                          for suffix in ("idlora_B.weight", "idlora_T.weight", "idlora_indices")}

    kwargs = {"low_cpu_mem_usage": True} if variant == "low_cpu_mem_usage" else {}
    loaded = PeftModel.from_pretrained(base(kind), tmp_path, **kwargs)
    torch.testing.assert_close(loaded(tokens).logits, expected, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(get_indices(loaded).values(), get_indices(peft_model).values()))
    # requires_grad after loading: frozen for inference, B and T trainable with is_trainable=True
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(base(kind), tmp_path, is_trainable=True, **kwargs)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all(".idlora_B.default." in n or ".idlora_T.default." in n for n in names)
    assert len(names) == 2 * len(layers(trainable))
    assert not any(b.requires_grad for b in trainable.buffers())


# ---------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("kind", MODELS)
def test_disable_adapter(kind, router, tokens):
    peft_model = trained(kind, router)
    adapted = peft_model(tokens).logits
    assert not torch.allclose(adapted, base_logits(kind, tokens))
    with peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(tokens).logits, base_logits(kind, tokens), rtol=0, atol=0)
    torch.testing.assert_close(peft_model(tokens).logits, adapted, rtol=0, atol=0)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("kind", MODELS)
def test_add_set_delete_adapter(kind, router, tokens):
    peft_model = trained(kind, router)
    default = peft_model(tokens).logits
    peft_model.add_adapter("other", config(kind, router, seed=3, rank_boost=1))
    peft_model.set_adapter("other")
    other = peft_model(tokens).logits
    assert not torch.allclose(other, default)
    grads = {n: p.requires_grad for n, p in peft_model.named_parameters() if ".idlora_" in n}
    assert all(grads[n] == (".other." in n) for n in grads)
    peft_model.set_adapter("default")
    torch.testing.assert_close(peft_model(tokens).logits, default, rtol=0, atol=0)
    peft_model.delete_adapter("other")
    assert "other" not in peft_model.peft_config and not any(".other" in k for k in peft_model.state_dict())
    torch.testing.assert_close(peft_model(tokens).logits, default, rtol=0, atol=0)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("kind", MODELS)
def test_multiple_active_adapters_against_an_independent_reference(kind, router):
    peft_model = trained(kind, router)
    peft_model.add_adapter("other", config(kind, "static" if router == "token" else "token", seed=3))
    peft_model.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        for layer in layers(peft_model):
            layer.idlora_T["other"].weight.normal_()
    for layer in layers(peft_model):
        h = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(7))
        expected = reference_forward(layer, ["default", "other"], h)
        torch.testing.assert_close(layer(h).double(), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(expected, reference_forward(layer, ["default"], h))


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("kind", MODELS)
def test_modules_to_save(kind, router, tmp_path, tokens):
    target = TARGETS[kind][1]
    peft_model = trained(kind, router, modules_to_save=[target])
    wrapped = peft_model.base_model.model.get_submodule(target)
    assert type(wrapped).__name__ == "ModulesToSaveWrapper"
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("modules_to_save.default" in n for n in trainable)
    with torch.no_grad():
        wrapped.modules_to_save["default"].weight.add_(0.5)
    expected = peft_model(tokens).logits
    peft_model.save_pretrained(tmp_path)
    assert any("modules_to_save" not in k and target in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(base(kind), tmp_path)
    torch.testing.assert_close(loaded(tokens).logits, expected, rtol=0, atol=0)
    with loaded.disable_adapter():
        torch.testing.assert_close(loaded(tokens).logits, base_logits(kind, tokens), rtol=0, atol=0)


# ---------------------------------------------------------------------------- trainable tokens
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("kind", MODELS)
def test_trainable_tokens_unload_and_merge_and_unload(kind, router, tokens):
    """Defect 1: with `trainable_token_indices`, `unload()` and `merge_and_unload()` raised a TypeError from
    PEFT's generic `BaseTuner._replace_module` for both routers."""
    embedding = TARGETS[kind][2]
    make = lambda: trained(kind, router, trainable_token_indices={embedding: [1, 2, 5]})  # noqa: E731
    peft_model = make()
    assert any("token_adapter" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    unloaded = peft_model.unload()  # the README: unload() always works
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    torch.testing.assert_close(unloaded(tokens).logits, base_logits(kind, tokens), rtol=0, atol=0)

    peft_model = make()
    with torch.no_grad():  # trained token rows, so that merging them shows
        for name, param in peft_model.named_parameters():
            if "token_adapter.trainable_tokens_delta" in name:
                param.normal_()
    adapted = peft_model(tokens).logits
    if router == "token":
        with pytest.raises(ValueError, match="router='static'"):
            peft_model.merge_and_unload()
        return
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(merged(tokens).logits, adapted, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("safe_merge", [False, True])
def test_static_merge_unmerge_and_safe_merge(kind, safe_merge, tokens):
    peft_model = trained(kind, "static")
    originals = {k: v.clone() for k, v in peft_model.state_dict().items()}
    adapted = peft_model(tokens).logits
    peft_model.merge_adapter(safe_merge=safe_merge)
    assert all(m.merged for m in layers(peft_model))
    torch.testing.assert_close(peft_model(tokens).logits, adapted, rtol=1e-4, atol=1e-4)
    with peft_model.disable_adapter():  # disabling unmerges
        torch.testing.assert_close(peft_model(tokens).logits, base_logits(kind, tokens), rtol=1e-4, atol=1e-4)
    peft_model.merge_adapter()
    peft_model.unmerge_adapter()
    for key, value in peft_model.state_dict().items():
        torch.testing.assert_close(value, originals[key], rtol=0, atol=1e-6)
    merged = peft_model.merge_and_unload(safe_merge=safe_merge)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(merged(tokens).logits, adapted, rtol=1e-4, atol=1e-4)


def test_safe_merge_refuses_non_finite_weights():
    peft_model = trained("linear", "static")
    layer = layers(peft_model)[0]
    with torch.no_grad():
        layer.idlora_B["default"].weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="NaNs or infs"):
        peft_model.merge_adapter(safe_merge=True)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("how", ["merge_and_unload", "merge_adapter"])
def test_mixed_routers_refuse_to_merge_and_change_nothing(kind, how, tokens):
    """Defect 2: a static adapter on one module and a token adapter on another, both active: the merge must be
    refused before any module is merged or unloaded (the static modules used to be merged first)."""
    targets = TARGETS[kind][0]
    peft_model = trained(kind, "static", target_modules=targets[:1])
    peft_model.add_adapter("token", config(kind, "token", target_modules=targets[1:]))
    peft_model.base_model.set_adapter(["default", "token"])
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    logits, count = peft_model(tokens).logits, len(layers(peft_model))
    with pytest.raises(ValueError, match=r"'token'.*token router.*router='static'"):
        getattr(peft_model, how)()
    after = peft_model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(m.merged for m in layers(peft_model)) and len(layers(peft_model)) == count
    torch.testing.assert_close(peft_model(tokens).logits, logits, rtol=0, atol=0)
