"""Precision: half-precision bases, `autocast_adapter_dtype`, `.to(bf16)` after wrapping and `torch.autocast`.

ID-LoRA's update is quadratic in the activations, so its parameters and arithmetic stay float32 (docs/METHOD.md)
whatever the base dtype; only the layer's output takes the base dtype. Both routers, Linear and Conv1D.
"""

import pytest
import torch
from helpers import make_gpt2, make_llama, reference_forward, set_nonzero_biases, update_reference
from peft import PeftModel, get_peft_model

from idlora_trl import IDLoRAConfig
from idlora_trl.layer import IDLoRALayer

ROUTERS = ["token", "static"]
KINDS = {"linear": (lambda: make_llama(bias=True), ["q_proj", "up_proj"]),
         "conv1d": (make_gpt2, ["c_attn", "c_fc"])}


def model_and_config(kind, router):
    make, targets = KINDS[kind]
    config = IDLoRAConfig(r=8, num_clusters=2, router=router, init_weights=False, target_modules=targets)
    return set_nonzero_biases(make()), config


def layers(model):
    return [m for m in model.modules() if isinstance(m, IDLoRALayer)]


def adapter_dtypes(model):
    return {p.dtype for n, p in model.named_parameters() if ".idlora_" in n}


def check_layers_in_float32(peft_model, dtype):
    """Every layer: output in the base dtype, equal (to the base dtype's rounding) to the float64 reference
    computed from the same (half-precision) base weights, with the adapter's own arithmetic in float32."""
    for layer in layers(peft_model):
        h = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
        out = layer(h)
        assert out.dtype == dtype
        expected = reference_forward(layer, ["default"], h)
        torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_keeps_a_float32_adapter(kind, router, dtype, tokens):
    model, config = model_and_config(kind, router)
    peft_model = get_peft_model(model.to(dtype), config)  # autocast_adapter_dtype=True, PEFT's default
    assert adapter_dtypes(peft_model) == {torch.float32}
    assert peft_model(tokens).logits.dtype == dtype
    check_layers_in_float32(peft_model, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_autocast_adapter_dtype_false_is_refused_on_a_half_precision_base(kind, dtype, tmp_path):
    """Defect 3: `autocast_adapter_dtype=False` was silently ignored. It is refused, naming the option and what
    to do, and the model is left as it was."""
    model, config = model_and_config(kind, "token")
    model = model.to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"autocast_adapter_dtype=False.*Leave autocast_adapter_dtype at its default"):
        get_peft_model(model, config, autocast_adapter_dtype=False)
    assert not layers(model) and model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    peft_model = get_peft_model(model, config)  # adding or loading a second adapter: refused the same way
    with pytest.raises(ValueError, match="autocast_adapter_dtype=False"):
        peft_model.add_adapter("other", config, autocast_adapter_dtype=False)
    assert set(peft_model.peft_config) == {"default"} and peft_model.active_adapters == ["default"]
    assert all("other" not in layer.idlora_B for layer in layers(peft_model))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="autocast_adapter_dtype=False"):
        PeftModel.from_pretrained(model_and_config(kind, "token")[0].to(dtype), tmp_path,
                                  autocast_adapter_dtype=False)


@pytest.mark.parametrize("kind", KINDS)
def test_autocast_adapter_dtype_false_on_a_float32_base_changes_nothing(kind, tokens):
    model, config = model_and_config(kind, "token")
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    assert adapter_dtypes(peft_model) == {torch.float32}
    assert torch.isfinite(peft_model(tokens).logits).all()


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cast", ["to", "method"])
def test_adapter_stays_float32_after_casting_the_peft_model(kind, router, cast, tokens):
    """Defect 5a: `peft_model.to(torch.bfloat16)` after wrapping turned B and T into bf16."""
    model, config = model_and_config(kind, router)
    peft_model = get_peft_model(model, config)
    params = {n: p for n, p in peft_model.named_parameters() if ".idlora_" in n}
    for p in params.values():
        p.grad = torch.ones_like(p)
    peft_model.to(torch.bfloat16) if cast == "to" else peft_model.bfloat16()
    assert adapter_dtypes(peft_model) == {torch.float32}
    assert all(p.grad.dtype == torch.float32 for p in params.values())
    assert all(p is dict(peft_model.named_parameters())[n] for n, p in params.items())  # same Parameter objects
    base_dtypes = {p.dtype for n, p in peft_model.named_parameters() if ".idlora_" not in n}
    assert base_dtypes == {torch.bfloat16}
    assert peft_model(tokens).logits.dtype == torch.bfloat16
    check_layers_in_float32(peft_model, torch.bfloat16)
    peft_model.to(torch.float64)  # a wider dtype is followed
    assert adapter_dtypes(peft_model) == {torch.float64}


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_arithmetic_is_float32_under_autocast(kind, router):
    """Defect 5b: under `torch.autocast(bfloat16)` (the Trainer's bf16=True) the update came out bf16, 0.73% off
    the float32 result. Every matmul of the adapter must see float32 inputs and weights; the update it adds to
    the (bf16) base output must be the float32 one."""
    model, config = model_and_config(kind, router)
    peft_model = get_peft_model(model, config)
    seen = []

    def record(module, inputs, output):
        seen.append((inputs[0].dtype, output.dtype))

    hooks = [m.register_forward_hook(record) for layer in layers(peft_model)
             for m in (*layer.idlora_B.values(), *layer.idlora_T.values())]
    for layer in layers(peft_model):
        h = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            base_out = layer.get_base_layer()(h)
            out = layer(h)
            update = layer._update("default", base_out)
        assert base_out.dtype == out.dtype == torch.bfloat16 and update.dtype == torch.float32
        # the float32 update of the (bf16) base output, against float64 arithmetic on the same input
        idx = layer.idlora_indices["default"]
        x = (base_out.double() - layer.get_base_layer().bias.double())[:, idx.reshape(-1)].unflatten(-1, idx.shape)
        expected = update_reference(x, layer.idlora_B["default"].weight, layer.idlora_T["default"].weight, router,
                                    f=layer.rank_boost["default"], scaling=layer.scaling["default"])
        torch.testing.assert_close(update.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.double(), base_out.double() + expected, rtol=2e-2, atol=2e-2)
    for hook in hooks:
        hook.remove()
    assert seen and all(dtypes == (torch.float32, torch.float32) for dtypes in seen)
