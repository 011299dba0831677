"""The router variants of ID-LoRA, as objects in the style of PEFT's `LoraVariant` (small classes of static methods).

The router decides the weights `alpha_i` that mix the gathered skeleton outputs `x_i` (`[M, k, r]`) into
`v = sum_i alpha_i x_i`. Everything that depends on which router an adapter uses lives here, one class per router:

- `TokenRouter` (`router="token"`, `router_norm="none"`, the paper's): `alpha_i = <T, x_i>`;
- `TokenRmsRouter` (`router="token"`, `router_norm="rms"`): `alpha_i = <T, x_i> c`, `c = rsqrt(r mean(x^2) + eps)`
  with the mean over the token's `k r` values (the same routing directions, `alpha_i` scale-free);
- `StaticRouter` (`router="static"`): `alpha_i = w_i`, one learned weight per cluster; the update is a fixed
  matrix and merges into the weight.

A variant owns its router's state and initialisation (`init`, `reset`), the forward arithmetic (`mix`), the
router-dependent part of `fused.GatherMixAdd`'s backward (`mix_backward`), merging (`check_mergeable`,
`delta_weight`, `merge_safe`, `merge_unsafe`, `unmerge`) and the on-demand overflow check (`check_overflow`).
The layer picks one per adapter in `update_layer` (`IDLoRALayer.idlora_variant[adapter]`, from `variant_for`).
The state-dict name of the router stays `idlora_T.<adapter>.weight` for every variant.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

RMS_EPS = 1e-12  # keeps rsqrt finite for an all-zero token (its alpha is 0 then: <T, 0> = 0)

Mixed = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


class ClusterWeights(nn.Module):
    """The static router's state: one learned weight `alpha_i` per cluster, starting at `1 / k`."""

    def __init__(self, num_clusters: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((num_clusters,), 1.0 / num_clusters))


def merge_error(module: Any, adapter_name: str) -> str:
    return (
        f"ID-LoRA adapter {adapter_name!r} on module {module.module_name!r} uses the token router: its update "
        "alpha_i = <T, x_i> depends on each token, so it is not a fixed matrix and cannot be merged into "
        "the weight. Train with IDLoRAConfig(router='static') to get a mergeable adapter, or use unload() "
        "to remove the adapter without merging."
    )


class RouterVariant:
    """The interface, with what the token routers share (they differ in `mix`, `mix_backward`, overflow).

    `module` is an `IDLoRALayer`; `rows` in `mix` are the gathered skeleton outputs `[M, k, r]`, `weight` the
    router's weight flattened (`[r]` for T, `[k]` for the static router). Nothing here reads a tensor on the host
    except `check_overflow`, which runs under `overflow.overflow_check` only.
    """

    @staticmethod
    def init(module: Any, adapter_name: str, config: Any) -> None:
        """Create the router's state `idlora_T[adapter_name]`: `T` as `nn.Linear(r -> 1)` (for its state-dict name)."""
        module.idlora_T[adapter_name] = nn.Linear(config.r, 1, bias=False)

    @staticmethod
    def reset(module: Any, adapter_name: str, config: Any) -> None:
        """Initial values (under no_grad): `T` small and random, so that gradients reach `B` (which starts at 0)."""
        nn.init.normal_(module.idlora_T[adapter_name].weight, std=config.router_std)

    @staticmethod
    def mix(rows: torch.Tensor, weight: torch.Tensor) -> Mixed:
        """`(v, alpha, c)`: `v` (`[M, r]`), `alpha` (`[M, k]`, or `[k]` static), `c` what the backward needs beyond
        them (`[M, 1]` for the rms router, else `None`). Differentiable."""
        raise NotImplementedError

    @staticmethod
    def mix_backward(rows: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, c: Optional[torch.Tensor],
                     grad_v: torch.Tensor, grad_alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(dL/drows, dL/dweight)` from `dL/dv` (`[M, r]`) and `dL/dalpha = <dL/dv, x_i>` (`[M, k]`)."""
        raise NotImplementedError

    @staticmethod
    def check_mergeable(module: Any, adapter_name: str) -> None:
        """Raise if the adapter's update is not a fixed matrix (token routers: it depends on each token)."""
        raise ValueError(merge_error(module, adapter_name))

    @classmethod
    def delta_weight(cls, module: Any, adapter_name: str, rows: torch.Tensor) -> torch.Tensor:
        """The update as a `[d_out, d_in]` matrix from the skeleton rows `W[idx]` of the unmerged weight."""
        cls.check_mergeable(module, adapter_name)
        raise NotImplementedError

    @classmethod
    def merge_safe(cls, module: Any, adapter_name: str, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`weight + delta` as a new tensor (`weight`: the `[d_out, d_in]` rows), checked finite."""
        merged = weight + cls.delta_weight(module, adapter_name, rows).to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(f"NaNs or infs in the merged weights of module {module.module_name!r} ({adapter_name!r}).")
        return merged

    @classmethod
    def merge_unsafe(cls, module: Any, adapter_name: str, rows: torch.Tensor, weight: torch.Tensor) -> None:
        """`weight += delta`, in place."""
        weight.add_(cls.delta_weight(module, adapter_name, rows).to(weight.dtype))

    @classmethod
    def unmerge(cls, module: Any, adapter_name: str, rows: torch.Tensor, weight: torch.Tensor) -> None:
        """`weight -= delta`, in place, with the rows the merge read (the delta is recomputed exactly)."""
        weight.sub_(cls.delta_weight(module, adapter_name, rows).to(weight.dtype))

    #: What to do about an update that overflowed (the end of `check_overflow`'s error); the routers differ.
    overflow_advice = ("The update is linear in the activations, like LoRA's: lower the learning rate, or "
                       "idlora_alpha (the scale s = idlora_alpha / r).")

    @classmethod
    def check_overflow(cls, module: Any, adapter_name: str, base_out: torch.Tensor, v: torch.Tensor) -> None:
        """Under `overflow.overflow_check` only (it syncs): an update that turns a finite base output into inf/NaN
        is an error naming the module, with the router's advice. The trainers run it when a loss is not finite."""
        B = module.idlora_B[adapter_name].weight.detach()
        update = nn.functional.linear(v.detach().unflatten(-1, (module.rank_boost[adapter_name], -1)).to(B.dtype), B)
        finite_update = bool(torch.isfinite(update * module.scaling[adapter_name]).all())
        if finite_update or not bool(torch.isfinite(base_out).all()):
            return
        T = module.idlora_T[adapter_name].weight.abs().max().item()
        raise FloatingPointError(
            f"ID-LoRA adapter {adapter_name!r} on module {module.module_name!r} turned a finite output into inf/NaN "
            f"(max |W h| = {base_out.abs().max().item():.3g}, max |T| = {T:.3g}, max |B| = "
            f"{B.abs().max().item():.3g}). {cls.overflow_advice}"
        )


def _token_alpha(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`a_i = <T, x_i>` (`[M, k]`)."""
    M, k, r = rows.shape  # explicit mv / bmm: torch.matmul picks its kernels by requires_grad (other bits)
    return torch.mv(rows.reshape(M * k, r), weight).view(M, k)


def _weighted(alpha: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`v = sum_i alpha_i x_i`: one `[1, k] x [k, r]` product per token."""
    M, _, r = rows.shape
    return torch.bmm(alpha.unsqueeze(1), rows).view(M, r)


def _token_backward(rows: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, grad_v: torch.Tensor,
                    grad_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Through `v = sum_i alpha_i x_i` and `a = <T, x_i>`, given `dL/da` (`[M, k]`)."""
    M, k, r = rows.shape
    grad_rows = alpha.unsqueeze(-1) * grad_v.unsqueeze(1)
    grad_weight = torch.mm(grad_a.view(1, M * k), rows.view(M * k, r))
    grad_rows.add_(grad_a.unsqueeze(-1) * weight.view(1, 1, r))
    return grad_rows, grad_weight


class TokenRouter(RouterVariant):
    """The paper's router (`router_norm="none"`): `alpha_i = <T, x_i>`, so `v` is quadratic in the activations."""

    overflow_advice = (
        "With router_norm='none' (the paper's router) the update is quadratic in the activations and overflows at "
        "this scale. Use router_norm='rms' (scale-free: the update is linear in the activations, like LoRA's; the "
        "default 'none' is the paper's router), or a lower learning rate.")

    @staticmethod
    def mix(rows: torch.Tensor, weight: torch.Tensor) -> Mixed:
        alpha = _token_alpha(rows, weight)
        return _weighted(alpha, rows), alpha, None

    @staticmethod
    def mix_backward(rows, weight, alpha, c, grad_v, grad_alpha):
        return _token_backward(rows, weight, alpha, grad_v, grad_alpha)


class TokenRmsRouter(RouterVariant):
    """`router_norm="rms"`: `alpha_i = <T, x_i> c`, `c = 1 / (sqrt(r) rms(x))`: `v` linear in the activations."""

    @staticmethod
    def mix(rows: torch.Tensor, weight: torch.Tensor) -> Mixed:
        r = rows.shape[-1]
        a = _token_alpha(rows, weight)
        c = torch.rsqrt(rows.square().mean(dim=(-2, -1)).unsqueeze(-1) * r + RMS_EPS)
        alpha = a * c
        return _weighted(alpha, rows), alpha, c

    @staticmethod
    def mix_backward(rows, weight, alpha, c, grad_v, grad_alpha):
        k = rows.shape[1]
        grad_rows, grad_weight = _token_backward(rows, weight, alpha, grad_v, grad_alpha * c)  # alpha = a c
        grad_c = (grad_alpha * alpha).sum(-1, keepdim=True) / c  # sum_i dL/dalpha_i a_i
        grad_rows.add_(rows * (grad_c * c.pow(3) / -k).unsqueeze(-1))  # dc/dx = -c^3 x / k
        return grad_rows, grad_weight


class StaticRouter(RouterVariant):
    """`router="static"`: one learned `alpha_i` per cluster (`ClusterWeights`); the update is a fixed matrix."""

    @staticmethod
    def init(module: Any, adapter_name: str, config: Any) -> None:
        module.idlora_T[adapter_name] = ClusterWeights(config.num_clusters)

    @staticmethod
    def reset(module: Any, adapter_name: str, config: Any) -> None:
        """`ClusterWeights` starts at `alpha_i = 1 / k`: nothing to draw."""

    @staticmethod
    def mix(rows: torch.Tensor, weight: torch.Tensor) -> Mixed:
        M, k, r = rows.shape
        return torch.bmm(weight.view(1, 1, k).expand(M, 1, k), rows).view(M, r), weight, None

    @staticmethod
    def mix_backward(rows, weight, alpha, c, grad_v, grad_alpha):
        k = rows.shape[1]
        return alpha.view(1, k, 1) * grad_v.unsqueeze(1), grad_alpha.sum(0)

    @staticmethod
    def check_mergeable(module: Any, adapter_name: str) -> None:
        """Always mergeable."""

    @classmethod
    def delta_weight(cls, module: Any, adapter_name: str, rows: torch.Tensor) -> torch.Tensor:
        """`s * blockdiag(B, .., B) @ sum_i alpha_i W[idx_i]` (`[d_out, d_in]`)."""
        k, r, f = module.num_clusters[adapter_name], module.r[adapter_name], module.rank_boost[adapter_name]
        alpha = module.idlora_T[adapter_name].weight.float()
        mixed = torch.einsum("k,krd->rd", alpha, rows.float().reshape(k, r, -1))  # [r, d_in]
        B = module.idlora_B[adapter_name].weight.float()  # [d_out/f, r/f]
        blocks = torch.einsum("or,frd->fod", B, mixed.reshape(f, r // f, -1))  # [f, d_out/f, d_in]
        return blocks.reshape(module.out_features, -1) * module.scaling[adapter_name]


def variant_for(router: str, router_norm: str) -> RouterVariant:
    """The variant of an adapter with these config fields (`IDLoRAConfig.router`, `router_norm`)."""
    if router == "static":
        return StaticRouter()
    return TokenRmsRouter() if router_norm == "rms" else TokenRouter()
