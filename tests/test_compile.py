"""`torch.compile` of ID-LoRA models: no graph break of ours, `fullgraph=True` works, compiled equals eager.

Each router on one adapted layer (with a bias, rank boost 2) and on a tiny Llama (all linear layers), PEFT LoRA as
the control of the graph-break count. The equality runs through Dynamo and AOTAutograd (`backend="aot_eager"`,
seconds on a CPU: it traces the adapted forward and the hand-written backward of `fused.GatherMixAdd`); the slow
tier also compiles with inductor, what `torch.compile` and the Trainer's `torch_compile=True` use by default.
"""

import pytest
import torch
import torch._dynamo as dynamo
from helpers import make_llama
from peft import LoraConfig, get_peft_model
from torch import nn

from idlora_trl import IDLoRAConfig

ROUTERS = {"token": {}, "token-rms": {"router_norm": "rms"}, "static": {"router": "static"}}


def one_layer(config) -> nn.Module:
    torch.manual_seed(0)
    return get_peft_model(nn.Sequential(nn.Linear(32, 48)), config)


def llama(config) -> nn.Module:
    return get_peft_model(make_llama(), config)


def idlora(router: str, targets) -> IDLoRAConfig:
    return IDLoRAConfig(r=8, num_clusters=2, rank_boost=2, init_weights=False, target_modules=targets,
                        **ROUTERS[router])


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(1)


CASES = {"one-layer": (one_layer, ["0"], lambda: torch.randn(3, 5, 32, generator=seeded())),
         "llama": (llama, "all-linear", lambda: torch.randint(0, 97, (2, 9), generator=seeded()))}


def run(model, inputs):
    out = model(inputs) if inputs.is_floating_point() else model(input_ids=inputs).logits
    out.square().mean().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def graph_breaks(model, inputs) -> int:
    dynamo.reset()
    call = (lambda x: model(x)) if inputs.is_floating_point() else (lambda x: model(input_ids=x))
    return dynamo.explain(call)(inputs).graph_break_count


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("case", list(CASES))
def test_compiles_without_graph_breaks_and_equals_eager(case, router):
    build, targets, make_inputs = CASES[case]
    inputs = make_inputs()
    assert graph_breaks(build(LoraConfig(r=4, target_modules=targets)), inputs) == 0  # the control
    model = build(idlora(router, targets))
    assert graph_breaks(model, inputs) == 0
    eager_out, eager_grads = run(model, inputs)
    dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, grads = run(compiled, inputs)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    model.eval()
    with torch.no_grad():  # the no-grad path (inference): no autograd node, the same arithmetic
        torch.testing.assert_close(compiled(inputs) if inputs.is_floating_point() else
                                   compiled(input_ids=inputs).logits, eager_out, rtol=1e-5, atol=1e-5)


def test_a_graph_break_put_back_is_caught(monkeypatch):
    """The count is no test if it misses a break: a host sync put back into the router's mix breaks the graph,
    and `fullgraph=True` refuses it."""
    from idlora_trl.variants import TokenRouter

    real_mix = TokenRouter.mix

    def mix_with_item(rows, weight):
        if rows.abs().amax().item() > 1e30:
            rows = rows / 2
        return real_mix(rows, weight)

    monkeypatch.setattr(TokenRouter, "mix", staticmethod(mix_with_item))
    build, targets, make_inputs = CASES["one-layer"]
    model, inputs = build(idlora("token", targets)), make_inputs()
    assert graph_breaks(model, inputs) >= 1
    dynamo.reset()
    with pytest.raises(Exception, match="item"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(inputs)
    dynamo.reset()


@pytest.mark.slow
def test_inductor_compiles_the_tiny_llama_equal_to_eager():
    model = llama(idlora("token", "all-linear"))
    inputs = CASES["llama"][2]()
    eager_out, eager_grads = run(model, inputs)
    dynamo.reset()
    out, grads = run(torch.compile(model, fullgraph=True), inputs)
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    dynamo.reset()
