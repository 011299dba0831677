"""Tests worth running on a GPU: `pytest -m cuda` (or `python -m benchmarks --gpu-check`) on a CUDA machine.

The adapted layer's forward and backward in float32 and bfloat16 against the float64 `helpers.dense_reference`
(every router), the float32 update under `torch.autocast`, and `get_peft_model` plus training steps and a save/load
round trip of a tiny Llama. Each test is parametrized over the device: the `cpu` variant runs in the normal suite, so
the test's own logic is checked where no GPU is lent; the `cuda` variant is marked `cuda` and skips without one.
"""

import pytest
import torch
from helpers import ROUTER_VARIANTS, dense_reference, make_llama, update_reference
from peft import PeftModel, get_peft_model
from torch import nn

from idlora_trl import IDLoRAConfig
from idlora_trl.layer import IDLoRALayer

NO_CUDA = "needs a CUDA device: run `pytest -m cuda` or `python -m benchmarks --gpu-check` on a GPU machine"
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                                  pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)])]
# relative error (Frobenius norm) allowed against the float64 reference: float32 arithmetic, or a bf16 base whose
# output (and so every gathered x_i) is rounded to 8 bits of mantissa
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # measured on the CPU: 3e-7 and 3.5e-3


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """No TF32 in float32 matmuls on the GPU (10-bit mantissa: it would need the bf16 tolerance)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved)


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("router", list(ROUTER_VARIANTS))
@pytest.mark.parametrize("rank_boost", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_layer_forward_backward_match_float64_reference(device, dtype, rank_boost, router):
    """y = W h + b + s blockdiag(B, .., B) sum_i alpha_i x_i with x_i = W[idx_i] h (`helpers.dense_reference`, for
    each router), and its gradients with respect to h, B and T, computed by autograd in float64 on the CPU from the
    layer's own (rounded) W, b, h, B and T."""
    kind, norm = ROUTER_VARIANTS[router]
    torch.manual_seed(0)
    d_in, d_out, k, r, scaling = 48, 96, 4, 8, 0.5
    base = nn.Linear(d_in, d_out, bias=True)
    with torch.no_grad():
        base.bias.normal_(std=0.5)  # x_i must not contain the bias: a non-zero one tests that
    model = nn.Sequential(base).to(device=device, dtype=dtype)
    peft_model = get_peft_model(model, IDLoRAConfig(r=r, num_clusters=k, rank_boost=rank_boost, init_weights=False,
                                                    router=kind, router_norm=norm, idlora_alpha=scaling * r,
                                                    target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    B, T = layer.idlora_B["default"].weight, layer.idlora_T["default"].weight
    with torch.no_grad():
        T.normal_()  # a router of order 1: the update is a sizeable part of the output
    assert B.dtype == T.dtype == torch.float32 and B.device.type == T.device.type == device
    idx = layer.idlora_indices["default"].cpu()
    assert idx.shape == (k, r) and len(set(idx.reshape(-1).tolist())) == k * r

    gen = torch.Generator().manual_seed(1)
    h = torch.randn(3, 5, d_in, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    grad_out = torch.randn(3, 5, d_out, generator=gen).to(device=device, dtype=dtype)
    out = layer(h)
    assert out.dtype == dtype and out.device.type == device
    out.backward(grad_out)
    assert base.weight.grad is None and base.bias.grad is None  # the base stays frozen

    W64, b64 = base.weight.detach().double().cpu(), base.bias.detach().double().cpu()
    h64, B64, T64 = (t.detach().double().cpu().requires_grad_(True) for t in (h, B, T))
    base_out = h64 @ W64.T + b64
    expected = dense_reference(W64, b64, idx, B64, T64, h64, kind, norm, rank_boost, scaling)
    expected.backward(grad_out.double().cpu())
    assert rel_error(base_out, expected) > 0.2  # a broken update path cannot pass

    tol = TOLERANCE[dtype]
    for name, got, want in (("output", out, expected), ("dL/dh", h.grad, h64.grad), ("dL/dB", B.grad, B64.grad),
                            ("dL/dT", T.grad, T64.grad)):
        assert got is not None and got.device.type == device, name
        assert rel_error(got, want) < tol, (name, rel_error(got, want))
    assert B.grad.dtype == T.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_update_is_float32_under_autocast(device):
    """A float32 base under `torch.autocast(bfloat16)` (a Trainer's bf16=True): the base output is bf16, but the
    adapter's update is float32 and equals the float64 one computed from that bf16 base output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64, bias=False)).to(device)
    peft_model = get_peft_model(model, IDLoRAConfig(r=8, num_clusters=4, init_weights=False, target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    h = torch.randn(7, 32, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        base_out = layer.get_base_layer()(h)
        update = layer._update("default", base_out)
        out = layer(h)
    assert base_out.dtype == out.dtype == torch.bfloat16 and update.dtype == torch.float32
    idx = layer.idlora_indices["default"].cpu()
    x = base_out.double().cpu()[:, idx.reshape(-1)].unflatten(-1, tuple(idx.shape))       # [n, k, r]
    expected = update_reference(x, layer.idlora_B["default"].weight.cpu(), layer.idlora_T["default"].weight.cpu(),
                                f=2, scaling=layer.scaling["default"])                    # token router, rank_boost 2
    assert rel_error(update, expected) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_get_peft_model_trains_saves_and_loads_on_device(device, tmp_path):
    """A bf16 tiny Llama on the device: get_peft_model clusters there (valid indices), five AdamW steps on a fixed
    batch lower its loss with float32 adapter weights and a frozen base, and the saved adapter loads onto a fresh
    copy of the base on the device with the same indices and outputs."""
    model = make_llama(seed=0).to(device=device, dtype=torch.bfloat16)
    peft_model = get_peft_model(model, IDLoRAConfig(r=8, num_clusters=2))
    layers = [m for m in peft_model.modules() if isinstance(m, IDLoRALayer)]
    frozen = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    assert len(layers) == 14  # seven projections in each of two layers
    for layer in layers:
        idx = layer.idlora_indices["default"]
        assert idx.device.type == device and idx.shape == (2, 8)
        assert len(set(idx.reshape(-1).tolist())) == 16 and 0 <= int(idx.min()) and int(idx.max()) < layer.out_features
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and p.device.type == device for p in trainable)

    tokens = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(2)).to(device)
    optimizer = torch.optim.AdamW(trainable, lr=5e-2)
    peft_model.train()
    losses = []
    for _ in range(5):
        loss = peft_model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in trainable)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    # B starts at zero and the tiny activations make the update small: a slow but steady descent
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])) and losses[-1] < losses[0] - 5e-3, losses
    assert all(layer.idlora_B["default"].weight.detach().abs().max() > 0 for layer in layers)  # B has moved off zero
    assert all(torch.equal(layer.get_base_layer().weight, w) for layer, w in zip(layers, frozen))

    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(input_ids=tokens).logits
    peft_model.save_pretrained(tmp_path)
    fresh = make_llama(seed=0).to(device=device, dtype=torch.bfloat16)
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    for (name, a), (_, b) in zip(peft_model.named_modules(), loaded.named_modules()):
        if isinstance(a, IDLoRALayer):
            assert torch.equal(a.idlora_indices["default"].cpu(), b.idlora_indices["default"].cpu()), name
            assert b.idlora_indices["default"].device.type == device
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, logits, rtol=1e-2, atol=1e-2)


CUDA_ONLY = [p for p in DEVICES if p.id == "cuda"]


@pytest.mark.parametrize("rank_boost", [1, 2])
@pytest.mark.parametrize("router", ["token", "token-rms", "static"])
@pytest.mark.parametrize("maker", ["linear", "conv1d"])
@pytest.mark.parametrize("device", CUDA_ONLY)
def test_no_host_sync_under_cuda_sync_debug_mode(device, maker, router, rank_boost):
    """tests/test_host_sync.py's models on the GPU with `torch.cuda.set_sync_debug_mode("error")`: any
    synchronising call in the adapted forward or backward raises (PEFT LoRA as the control)."""
    from helpers import make_gpt2
    from peft import LoraConfig
    from test_host_sync import adapted, idlora_config

    build, targets = (make_llama, "all-linear") if maker == "linear" else (make_gpt2, ["c_attn", "c_fc"])
    ids = torch.randint(0, 97, (2, 8), device=device)
    for config in (LoraConfig(r=4, target_modules=targets), idlora_config(router, rank_boost, targets)):
        model = adapted(build, config).to(device)
        model(input_ids=ids).logits.sum().backward()  # warm-up: lazy CUDA initialisation may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(input_ids=ids).logits.square().mean().backward()
            with torch.inference_mode():
                model.eval()(input_ids=ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_compiled_model_equals_eager_on_the_gpu(device):
    """The tiny Llama with the token router, compiled by inductor (`fullgraph=True`), forward and gradients."""
    from test_compile import idlora, run

    model = get_peft_model(make_llama(), idlora("token", "all-linear")).to(device)
    ids = torch.randint(0, 97, (2, 9), device=device)
    eager_out, eager_grads = run(model, ids)
    torch._dynamo.reset()
    out, grads = run(torch.compile(model, fullgraph=True), ids)
    assert rel_error(out, eager_out) < 1e-4
    assert all(rel_error(grads[name], eager_grads[name]) < 1e-4 for name in eager_grads)
