"""Gradients of the adapted layer (`fused.GatherMixAdd`'s hand-written backward, and the general autograd path)
against autograd through the independent float64 formula `helpers.dense_reference`: the skeleton rows multiplied
explicitly, no gather from the layer output, every router (the paper's, rms, static), rank boosting, non-zero biases,
Conv1D."""

import pytest
import torch
from helpers import ROUTER_VARIANTS, base_weight_rows, dense_reference, set_nonzero_biases
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from idlora_trl import IDLoRAConfig
from idlora_trl.fused import GatherMixAdd
from idlora_trl.layer import IDLoRALayer
from idlora_trl.variants import variant_for

def adapted(base: nn.Module, router: str, rank_boost: int, seed: int = 0):
    kind, norm = ROUTER_VARIANTS[router]
    config = IDLoRAConfig(r=8, num_clusters=3, rank_boost=rank_boost, router=kind, router_norm=norm,
                          idlora_alpha=12, init_weights=False, target_modules=["0"])
    model = get_peft_model(nn.Sequential(base), config)
    layer = next(m for m in model.modules() if isinstance(m, IDLoRALayer))
    with torch.no_grad():
        layer.idlora_T["default"].weight.normal_(generator=torch.Generator().manual_seed(seed))
    return model, layer


def check_gradients(layer, router, rank_boost, h, out_grad, input_grad=True):
    kind, norm = ROUTER_VARIANTS[router]
    base = layer.get_base_layer()
    B, T = layer.idlora_B["default"].weight, layer.idlora_T["default"].weight
    h = h.clone().requires_grad_(input_grad)
    got = layer(h)
    got.backward(out_grad)
    h64 = h.detach().double().requires_grad_(input_grad)
    B64, T64 = B.detach().double().requires_grad_(), T.detach().double().requires_grad_()
    bias = base.bias.detach().double() if base.bias is not None else None
    expected = dense_reference(base_weight_rows(layer).double(), bias, layer.idlora_indices["default"], B64, T64,
                               h64.reshape(-1, h.shape[-1]), kind, norm, rank_boost, 12 / 8)
    expected.backward(out_grad.double().reshape(expected.shape))
    torch.testing.assert_close(got.detach().double().reshape(expected.shape), expected.detach(),
                               rtol=1e-5, atol=1e-5)
    pairs = [(B.grad, B64.grad), (T.grad, T64.grad)] + ([(h.grad, h64.grad.reshape(h.shape))] if input_grad else [])
    for mine, theirs in pairs:
        assert theirs.abs().max() > 1e-3  # a gradient that is really there
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["fused", "general"])
@pytest.mark.parametrize("router", list(ROUTER_VARIANTS))
@pytest.mark.parametrize("rank_boost", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_gradients_match_dense_reference(path, router, rank_boost, bias, monkeypatch):
    base = nn.Linear(20, 24, bias=bias)
    if bias:
        set_nonzero_biases(base)
    model, layer = adapted(base, router, rank_boost)
    if path == "general":  # the autograd path of several adapters, half-precision bases and dropout
        monkeypatch.setattr(type(layer), "_fused_forward", lambda *args: None)
    calls = []
    monkeypatch.setattr(GatherMixAdd, "backward", record(calls, GatherMixAdd.backward))
    gen = torch.Generator().manual_seed(1)
    h, out_grad = torch.randn(2, 5, 20, generator=gen), torch.randn(2, 5, 24, generator=gen)
    check_gradients(layer, router, rank_boost, h, out_grad)
    assert len(calls) == (1 if path == "fused" else 0)


def record(calls, backward):
    def wrapped(ctx, *grads):
        calls.append(ctx)
        return backward(ctx, *grads)
    return staticmethod(wrapped)


@pytest.mark.parametrize("router", list(ROUTER_VARIANTS))
def test_conv1d_gradients_match_dense_reference(router):
    """Conv1D's output is a view of its addmm: the in-place update and its backward go through the view."""
    base = set_nonzero_biases(Conv1D(24, 20))  # nf=24 outputs, nx=20 inputs; weight stored [20, 24]
    _, layer = adapted(base, router, 2)
    gen = torch.Generator().manual_seed(2)
    check_gradients(layer, router, 2, torch.randn(3, 4, 20, generator=gen), torch.randn(3, 4, 24, generator=gen))


@pytest.mark.parametrize("router", list(ROUTER_VARIANTS))
def test_gradients_without_an_input_gradient(router):
    """The first adapted layer of a frozen model: its input needs no gradient, B and T do."""
    _, layer = adapted(nn.Linear(20, 24), router, 1)
    gen = torch.Generator().manual_seed(3)
    check_gradients(layer, router, 1, torch.randn(6, 20, generator=gen), torch.randn(6, 24, generator=gen),
                    input_grad=False)


def test_frozen_adapter_passes_the_input_gradient():
    """B and T frozen (a loaded adapter, not trainable): the input still gets the adapter's share."""
    _, layer = adapted(nn.Linear(20, 24), "token", 2)
    for p in layer.parameters():
        p.requires_grad_(False)
    h = torch.randn(6, 20, requires_grad=True)
    out_grad = torch.randn(6, 24)
    layer(h).backward(out_grad)
    W = base_weight_rows(layer).double()
    h64 = h.detach().double().requires_grad_()
    dense_reference(W, layer.get_base_layer().bias.double(), layer.idlora_indices["default"],
                    layer.idlora_B["default"].weight.double(), layer.idlora_T["default"].weight.double(), h64,
                    "token", "none", 2, 12 / 8).backward(out_grad.double())
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("router", list(ROUTER_VARIANTS))
def test_gather_mix_add_passes_gradcheck(router):
    """The hand-written backward against finite differences, in float64, with a bias and rank boosting."""
    kind, norm = ROUTER_VARIANTS[router]
    gen = torch.Generator().manual_seed(4)
    k, r, f, d_out = 2, 4, 2, 10
    flat = torch.randperm(d_out, generator=gen)[: k * r]
    bias = torch.randn(k * r, dtype=torch.float64, generator=gen)
    B = torch.randn(d_out // f, r // f, dtype=torch.float64, generator=gen, requires_grad=True)
    router_weight = torch.randn(k if kind == "static" else (1, r), dtype=torch.float64, generator=gen,
                                requires_grad=True)
    base_out = torch.randn(3, d_out, dtype=torch.float64, generator=gen, requires_grad=True)

    def fn(base_out, B, router_weight):
        return GatherMixAdd.apply(base_out.clone(), flat, bias, B, router_weight, variant_for(kind, norm), k, 0.7)

    assert torch.autograd.gradcheck(fn, (base_out, B, router_weight))
