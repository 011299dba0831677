"""The adapted forward against an explicit dense reference, gradients, and merging."""

import pytest
import torch
from helpers import ROUTER_VARIANTS, base_weight_rows, dense_reference, make_gpt2, make_llama, set_nonzero_biases
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from idlora_trl import IDLoRAConfig
from idlora_trl.layer import IDLoRALayer, idlora_layers


GRAD_MODES = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("mode", list(GRAD_MODES))  # no_grad / inference_mode add the update in place
@pytest.mark.parametrize("router", list(ROUTER_VARIANTS))
@pytest.mark.parametrize("rank_boost", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_dense_reference(router, rank_boost, bias, mode):
    model = make_llama(bias=bias)
    if bias:  # tiny Llama initialises biases to zero: without this the bias handling would go untested
        set_nonzero_biases(model)
    kind, norm = ROUTER_VARIANTS[router]
    config = IDLoRAConfig(r=8, num_clusters=3, rank_boost=rank_boost, router=kind, router_norm=norm, idlora_alpha=12,
                          init_weights=False, target_modules=["q_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # a static router away from its uniform start
        for module in peft_model.modules():
            if isinstance(module, IDLoRALayer) and kind == "static":
                module.idlora_T["default"].weight.normal_()
    h_all = torch.randn(5, 128)
    checked = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, IDLoRALayer):
            continue
        base = module.get_base_layer()
        h = h_all[:, : module.in_features]
        assert (base.bias is not None) == bias
        expected = dense_reference(
            base_weight_rows(module), base.bias, module.idlora_indices["default"], module.idlora_B["default"].weight,
            module.idlora_T["default"].weight, h, kind, norm, rank_boost, 12 / 8,
        )
        with GRAD_MODES[mode]():
            got = module(h)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        # the update is really there (B != 0), so a broken update path could not pass
        bias_out = base.bias.double() if bias else 0
        assert (got.double() - (h.double() @ base.weight.double().T + bias_out)).abs().max() > 1e-3
        checked += 1
    assert checked == 4


@pytest.mark.parametrize("mode", list(GRAD_MODES))
def test_conv1d_forward_matches_dense_reference(mode):
    model = set_nonzero_biases(make_gpt2())  # GPT-2 initialises its Conv1D biases to zero
    peft_model = get_peft_model(model, IDLoRAConfig(r=8, num_clusters=4, init_weights=False,
                                                    target_modules=["c_attn", "c_fc"]))
    layers = [m for m in peft_model.modules() if isinstance(m, IDLoRALayer)]
    assert layers and all(isinstance(m.get_base_layer(), Conv1D) for m in layers)
    for module in layers:
        base = module.get_base_layer()
        assert base.bias.abs().min() > 0
        h = torch.randn(3, module.in_features)
        expected = dense_reference(base.weight.T, base.bias, module.idlora_indices["default"],
                                   module.idlora_B["default"].weight, module.idlora_T["default"].weight, h, f=2)
        with GRAD_MODES[mode]():
            got = module(h)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_adapter_path_runs_in_float32_under_bf16_base():
    model = make_llama().to(torch.bfloat16)
    peft_model = get_peft_model(model, IDLoRAConfig(r=8, num_clusters=2, init_weights=False,
                                                    target_modules=["q_proj"]))
    layer = next(m for m in peft_model.modules() if isinstance(m, IDLoRALayer))
    assert layer.idlora_B["default"].weight.dtype == torch.float32
    h = torch.randn(4, 64, dtype=torch.bfloat16)
    out = layer(h)
    assert out.dtype == torch.bfloat16
    expected = dense_reference(base_weight_rows(layer).float(), None, layer.idlora_indices["default"],
                               layer.idlora_B["default"].weight, layer.idlora_T["default"].weight, h.float(), f=2)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_gradients_reach_only_B_and_T(tokens):
    model = make_llama()
    peft_model = get_peft_model(model, IDLoRAConfig(r=8, num_clusters=2))
    peft_model.train()
    loss = peft_model(tokens, labels=tokens).loss
    loss.backward()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert trainable == with_grad
    assert trainable and all(".idlora_B.default." in n or ".idlora_T.default." in n for n in trainable)
    assert any(".idlora_T." in n for n in trainable) and any(".idlora_B." in n for n in trainable)
    # B starts at zero, but its gradient does not vanish (T is random), so training can start
    assert all(p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if ".idlora_B." in n)
    assert not any(b.requires_grad for n, b in peft_model.named_buffers())


def test_zero_init_leaves_the_model_unchanged(tokens):
    model = make_llama()
    expected = model(tokens).logits
    peft_model = get_peft_model(model, IDLoRAConfig(r=8, num_clusters=2))
    assert torch.equal(peft_model(tokens).logits, expected)


def test_dropout_applies_in_training_only():
    layer_model = nn.Sequential(nn.Linear(16, 32))
    peft_model = get_peft_model(layer_model, IDLoRAConfig(r=4, num_clusters=2, idlora_dropout=0.5,
                                                          init_weights=False, target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    h = torch.randn(64, 16)
    peft_model.eval()
    assert torch.equal(layer(h), layer(h))
    peft_model.train()
    assert not torch.equal(layer(h), layer(h))


@pytest.mark.parametrize("maker", [make_llama, make_gpt2])
def test_static_router_merges_and_unmerges_exactly(maker, tokens):
    model = maker()
    peft_model = get_peft_model(model, IDLoRAConfig(r=8, num_clusters=2, router="static", init_weights=False))
    layers = [m for m in peft_model.modules() if isinstance(m, IDLoRALayer)]
    with torch.no_grad():
        for module in layers:
            module.idlora_T["default"].weight.normal_()
    originals = [m.get_base_layer().weight.detach().clone() for m in layers]
    adapted = peft_model(tokens).logits
    peft_model.merge_adapter()
    assert all(m.merged for m in layers)
    torch.testing.assert_close(peft_model(tokens).logits, adapted, rtol=1e-4, atol=1e-4)
    assert any(not torch.equal(m.get_base_layer().weight, w) for m, w in zip(layers, originals))
    peft_model.unmerge_adapter()
    for module, weight in zip(layers, originals):
        torch.testing.assert_close(module.get_base_layer().weight, weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(peft_model(tokens).logits, adapted, rtol=1e-5, atol=1e-5)
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, IDLoRALayer) for m in merged.modules())
    torch.testing.assert_close(merged(tokens).logits, adapted, rtol=1e-4, atol=1e-4)


def test_two_static_adapters_merge_from_the_unmerged_weight(tokens):
    model = make_llama()
    config = dict(r=8, num_clusters=2, router="static", init_weights=False, target_modules=["q_proj", "o_proj"])
    peft_model = get_peft_model(model, IDLoRAConfig(**config))
    peft_model.add_adapter("other", IDLoRAConfig(**config, seed=1))
    peft_model.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, IDLoRALayer):
                for name in ("default", "other"):
                    module.idlora_T[name].weight.normal_()
    both = peft_model(tokens).logits
    peft_model.merge_adapter(["default", "other"])
    torch.testing.assert_close(peft_model(tokens).logits, both, rtol=1e-4, atol=1e-4)


def test_token_router_refuses_to_merge_and_unloads(tokens):
    model = make_llama()
    expected = model(tokens).logits
    peft_model = get_peft_model(model, IDLoRAConfig(r=8, num_clusters=2, init_weights=False))
    with pytest.raises(ValueError, match=r"token router.*router='static'"):
        peft_model.merge_and_unload()
    with pytest.raises(ValueError, match="router='static'"):
        peft_model.merge_adapter()
    assert not any(m.merged for m in peft_model.modules() if isinstance(m, IDLoRALayer))
    unloaded = peft_model.unload()
    assert torch.equal(unloaded(tokens).logits, expected)


@pytest.mark.parametrize("mode", list(GRAD_MODES))
@pytest.mark.parametrize("rank_boost", [1, 2])
def test_rms_router_matches_dense_reference_with_bias(rank_boost, mode):
    """router_norm="rms": alpha_i = <T, x_i> / (sqrt(r) rms(x)) (`helpers.dense_reference`) on a Linear whose bias
    is non-zero (x_i must not contain it), with tokens of very different sizes."""
    torch.manual_seed(0)
    d_in, d_out, k, r, scaling = 24, 40, 4, 6, 0.75
    base = nn.Linear(d_in, d_out, bias=True)
    with torch.no_grad():
        base.bias.normal_(std=3.0)
    peft_model = get_peft_model(nn.Sequential(base), IDLoRAConfig(
        r=r, num_clusters=k, rank_boost=rank_boost, router_norm="rms", idlora_alpha=scaling * r, init_weights=False,
        target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    h = torch.randn(7, d_in) * torch.logspace(-2, 2, 7).unsqueeze(1)  # tokens of very different sizes
    W, b = layer.get_base_layer().weight.double(), layer.get_base_layer().bias.double()
    expected = dense_reference(W, b, layer.idlora_indices["default"], layer.idlora_B["default"].weight,
                               layer.idlora_T["default"].weight, h, "token", "rms", rank_boost, scaling)
    with GRAD_MODES[mode]():
        got = layer(h)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # the update is linear in the activations: doubling h doubles it (the paper's router would quadruple it)
    update = lambda inputs: layer(inputs).double() - (inputs.double() @ W.T + b)  # noqa: E731
    torch.testing.assert_close(update(2 * h), 2 * update(h), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("router_norm", ["rms", "none"])
def test_large_activations_stay_finite_or_are_reported(router_norm):
    """Inputs of magnitude ~90, r=1, default initialisation, three SGD steps at lr 0.01: LoRA stays finite, and
    so does ID-LoRA with the rms router; the paper's quadratic router (the default, router_norm="none") overflows.
    The forward does not check (no host sync); under `overflow_check` the same forward names the module and the
    default correctly, and the model is left as it was (the check is off again afterwards)."""
    from peft import LoraConfig

    from idlora_trl import overflow_check

    h = 90 * torch.randn(32, 16, generator=torch.Generator().manual_seed(1))

    def train(config):
        torch.manual_seed(0)
        model = get_peft_model(nn.Sequential(nn.Linear(16, 16)), config)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        for _ in range(3):
            optimizer.zero_grad()
            model(h).square().mean().backward()
            optimizer.step()
        return model

    assert torch.isfinite(train(LoraConfig(r=1, target_modules=["0"]))(h)).all()
    config = IDLoRAConfig(r=1, num_clusters=2, rank_boost=1, router_norm=router_norm, target_modules=["0"])
    model = train(config)
    if router_norm == "rms":
        with overflow_check(model):
            assert torch.isfinite(model(h)).all()
        return
    assert not torch.isfinite(model(h)).all()
    with pytest.raises(FloatingPointError, match=r"module '0'.*router_norm='rms'") as error, overflow_check(model):
        model(h)
    message = str(error.value)
    assert "the default 'none' is the paper's router" in message and "(the default" not in message
    assert not any(layer.check_overflow for _, layer in idlora_layers(model))


@pytest.mark.parametrize("router,router_norm,advice", [
    ("token", "none", r"quadratic in the activations.*router_norm='rms'"),
    ("token", "rms", r"linear in the activations, like LoRA's: lower the learning rate"),
    ("static", "none", r"linear in the activations, like LoRA's: lower the learning rate"),
    ("static", "rms", r"linear in the activations, like LoRA's: lower the learning rate"),
])
def test_every_router_names_the_module_whose_update_overflowed(router, router_norm, advice):
    """Whatever the router, an update that turns a finite output into inf is named under `overflow_check` (the
    trainers then say so instead of blaming the base model), and the advice fits the router: only the paper's
    quadratic router is told to switch to rms. T and B are set to 1e20 so that the update overflows float32."""
    from idlora_trl import overflow_check

    torch.manual_seed(0)
    config = IDLoRAConfig(r=2, num_clusters=2, rank_boost=1, router=router, router_norm=router_norm,
                          target_modules=["0"])
    model = get_peft_model(nn.Sequential(nn.Linear(16, 16)), config)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.idlora_T["default"].weight.fill_(1e20)
        layer.idlora_B["default"].weight.fill_(1e20)
        h = torch.randn(4, 16)
        assert not torch.isfinite(model(h)).all()  # the forward itself does not check
        with pytest.raises(FloatingPointError, match=r"module '0' turned a finite output into inf/NaN.*" + advice), \
                overflow_check(model):
            model(h)


@pytest.mark.parametrize("mode", list(GRAD_MODES))
def test_no_tokens_gives_an_empty_output(mode):
    """A batch without tokens (shape [2, 0, d_in]) passes through: the overflow check has nothing to reduce."""
    model = get_peft_model(nn.Sequential(nn.Linear(16, 12)), IDLoRAConfig(r=2, num_clusters=2, target_modules=["0"]))
    with GRAD_MODES[mode]():
        assert model(torch.zeros(2, 0, 16)).shape == (2, 0, 12)


@pytest.mark.parametrize("maker", [make_llama, make_gpt2], ids=["linear", "conv1d"])
def test_eval_mode_with_gradients_enabled(maker):
    """`model.eval()` with autograd on (evaluation that keeps gradients, e.g. for saliency): the in-place update
    of the base output is valid for both base layer types (Conv1D returns a view), and the gradients are those of
    train mode (dropout off)."""
    model = get_peft_model(maker(), IDLoRAConfig(r=8, num_clusters=2, init_weights=False))
    for module in model.modules():  # GPT-2's own dropout would make the modes differ
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    grads = []
    for mode in (model.train, model.eval):
        mode()
        model.zero_grad()
        model(input_ids=ids).logits.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads)) and len(grads[0]) > 0
