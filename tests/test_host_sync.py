"""No host synchronisation in the adapted forward or backward, in training or inference.

On a GPU every `.item()`, `.tolist()`, `bool(tensor)` or `nonzero` stalls the launch queue until the device catches
up; the overflow check used to make one per adapted module per forward (150 per decoding step of SmolLM2). The
detector here records those calls on a CPU, at both levels where they can happen: Python (a TorchFunctionMode sees
`Tensor.item`, `tolist`, `__bool__`, ...) and ATen (a TorchDispatchMode sees `_local_scalar_dense`, `nonzero`,
`is_nonzero`, also from C++). PEFT LoRA is the control (none), and a sync put back on purpose is caught. The cuda
tier (tests/test_cuda.py) runs the same models under `torch.cuda.set_sync_debug_mode("error")`.
"""

import pytest
import torch
from helpers import make_gpt2, make_llama
from peft import LoraConfig, get_peft_model
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from idlora_trl import IDLoRAConfig

PYTHON_SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "data_ptr"}
ATEN_SYNCS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal"}
ROUTERS = {"token": {}, "token-rms": {"router_norm": "rms"}, "static": {"router": "static"}}


class SyncDetector:
    """A context recording every host-synchronising call made inside it (`calls`: their names, in order)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        detector = self

        class Python(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") in PYTHON_SYNCS:
                    detector.calls.append(func.__name__)
                return func(*args, **(kwargs or {}))

        class Aten(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ in ATEN_SYNCS:
                    detector.calls.append(f"aten.{func.overloadpacket.__name__}")
                return func(*args, **(kwargs or {}))

        self._modes = (Python(), Aten())

    def __enter__(self) -> "SyncDetector":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def adapted(maker, config, seed: int = 0):
    """A tiny model with the adapter not at its identity start (B != 0), so every branch of the update runs."""
    model = get_peft_model(maker(seed=seed), config)
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data.normal_(0, 0.1)
    return model


def syncs(model, train: bool) -> list[str]:
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    with SyncDetector() as detector:
        if train:
            model.train()
            model(input_ids=ids).logits.square().mean().backward()
        else:
            model.eval()
            with torch.inference_mode():
                model(input_ids=ids)
    return detector.calls


def idlora_config(router: str, rank_boost: int, targets="all-linear") -> IDLoRAConfig:
    return IDLoRAConfig(r=8, num_clusters=2, rank_boost=rank_boost, target_modules=targets, init_weights=False,
                        **ROUTERS[router])


@pytest.mark.parametrize("train", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("rank_boost", [1, 2])
@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("maker", [make_llama, make_gpt2], ids=["linear", "conv1d"])
def test_the_adapted_forward_and_backward_never_sync(maker, router, rank_boost, train):
    targets = "all-linear" if maker is make_llama else ["c_attn", "c_fc"]
    assert syncs(adapted(maker, LoraConfig(r=4, target_modules=targets)), train) == []  # the control
    assert syncs(adapted(maker, idlora_config(router, rank_boost, targets)), train) == []


def test_the_first_forward_after_loading_does_not_sync_either(tmp_path):
    """Loaded index tables are checked while they load, not at the first forward."""
    from peft import PeftModel

    adapted(make_llama, idlora_config("token", 2)).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(make_llama(), tmp_path)
    assert syncs(model, train=False) == []


def test_a_sync_put_back_is_caught(monkeypatch):
    """The detector is no test if it misses a sync: put one back into the router's mix, at the Python level and
    at the ATen level, and it is seen."""
    from idlora_trl.variants import TokenRouter

    real_mix = TokenRouter.mix

    def mix_with_item(rows, weight):
        rows.abs().amax().item()
        return real_mix(rows, weight)

    monkeypatch.setattr(TokenRouter, "mix", staticmethod(mix_with_item))
    assert "item" in syncs(adapted(make_llama, idlora_config("token", 2)), train=True)
    with SyncDetector() as detector:
        torch.ops.aten._local_scalar_dense(torch.ones(()))
    assert detector.calls == ["aten._local_scalar_dense"]
