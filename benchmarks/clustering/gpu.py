"""Part of section 2 (and of the GPU check): the product's per-module clustering call on random matrices of each
distinct Llama-3-8B shape, on any device."""
from __future__ import annotations

import torch

from benchmarks.common import interleaved, log, timed
from benchmarks.stats import median

LLAMA3_8B_SHAPES = {"q_proj, o_proj": ((4096, 4096), 2), "k_proj, v_proj": ((1024, 4096), 2),
                    "gate_proj, up_proj": ((14336, 4096), 2), "down_proj": ((4096, 14336), 1)}
SHAPE_CAP_S = 30.0  # timed runs per shape drop to one above this


def product_select(weight: torch.Tensor, k: int, r: int, seed: int = 0, name: str = "w") -> torch.Tensor:
    """The product's per-module clustering call, as `idlora_trl.skeleton.decompose_layers` makes it: a float32
    copy of the weight, then the `idlora_select_rows` hook (the built-in PMRC plugin: `select_rows`)."""
    from idlora_trl import IDLoRAConfig
    from idlora_trl.plugins import get_plugin_manager

    config = IDLoRAConfig(r=r, num_clusters=k, seed=seed)
    copy = weight.detach().to(torch.float32, copy=True)
    return get_plugin_manager().hook.idlora_select_rows(weight=copy, module_name=name, config=config)


def llama_shapes(divisor: int = 1) -> list[tuple[str, tuple[int, int], int]]:
    """(modules, (d_out, d_in), matrices per layer) of each distinct Llama-3-8B weight shape, sides / divisor."""
    return [(label, (d_out // divisor, d_in // divisor), per_layer)
            for label, ((d_out, d_in), per_layer) in LLAMA3_8B_SHAPES.items()]


def random_weight(shape, device: str, gen: torch.Generator, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(shape, device=device, generator=gen).mul_(0.02).to(dtype)  # a Llama-like init


def time_llama_shapes(device: str, k: int, r: int, seed: int, repeats: int, divisor: int = 1) -> list[dict]:
    """One random matrix of each distinct shape on `device`, clustered by `product_select`: one untimed run,
    then `repeats` timed ones (synchronized; one only if they would take over SHAPE_CAP_S). Rows as the
    clustering section stores them."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for label, shape, per_layer in llama_shapes(divisor):
        w = random_weight(shape, device, gen)
        first = timed(lambda w=w: product_select(w, k, r, seed))  # one-time set-up included: not in the median
        n = repeats if first * repeats <= SHAPE_CAP_S else 1
        times = interleaved({"ours": lambda w=w: product_select(w, k, r, seed)}, repeats=n)["ours"]
        rows.append({"modules": label, "shape": list(shape), "per_layer": per_layer, "seconds": times})
        log(f"gpu-check: clustering {label} {shape[0]}x{shape[1]}: {median(times):.3f} s")
    return rows
