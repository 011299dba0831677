"""The adapted forward of one float32 adapter as one autograd node, with its backward written out.

Paper, Eq. 3-4, for the `N` tokens of a base output `Y = W h + b` (`[N, d_out]`):

    x_i   = Y[:, idx_i] - b[idx_i]                 the skeleton outputs A_i h (`[N, k, r]`)
    alpha = <T, x_i>                               token router, `router_norm="none"` (the paper's)
          = <T, x_i> * c,  c = rsqrt(r mean(x^2) + eps)    token router, `router_norm="rms"` (mean over k*r)
          = w_i                                    static router (one weight per cluster)
    v     = sum_i alpha_i x_i                      (`[N, r]`)
    out   = Y + s * concat_j(B v_j)                rank boosting: v in f blocks of r/f, one shared B

Autograd would record about ten nodes for this and, in the backward, build the gradient of `Y` twice: once
from `out` (the identity) and once from the gather (a zero `[N, d_out]` tensor, scattered into, then added to
the first). `GatherMixAdd` adds the update into `Y` in place (no new `[N, d_out]` tensor in the forward) and
its backward copies the output gradient once and adds the `k r` gathered columns' gradient into it.

The router's part is the adapter's variant (`variants.py`: token, token with rms, static): its `mix` is the one
implementation of the forward arithmetic of `alpha` and `v`, and its `mix_backward` the router-dependent part of the
backward (`dL/dx_i` and `dL/dT` from `dL/dv`); the rest is shared. The layer's general path (several adapters,
half-precision bases, dropout) runs the same `mix` under ordinary autograd. Tests compare both paths, and their
gradients, with one dense reference written independently (`tests/helpers.py::dense_reference`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .variants import RouterVariant


def _forward_(base_out: torch.Tensor, flat: torch.Tensor, bias: Optional[torch.Tensor], B: torch.Tensor,
              router: torch.Tensor, variant: RouterVariant, k: int, scale: float):
    """Adds the update into `base_out` (contiguous, float32) in place; returns what the backward needs."""
    width = B.shape[1]  # r / f
    gathered = base_out.view(-1, base_out.shape[-1]).index_select(1, flat)  # [M, k r], a new tensor
    if bias is not None:
        gathered.sub_(bias)
    rows = gathered.view(gathered.shape[0], k, flat.numel() // k)
    v, alpha, c = variant.mix(rows, router.view(-1))
    base_out.view(-1, B.shape[0]).addmm_(v.view(-1, width), B.t(), alpha=scale)
    return rows, v, alpha, c


class GatherMixAdd(torch.autograd.Function):
    """`out = Y + s * concat_j(B v_j)` with `v` gathered from `Y` itself, `Y` updated in place (marked dirty)."""

    @staticmethod
    def forward(ctx, base_out, flat, bias, B, router, variant, k, scale):
        rows, v, alpha, c = _forward_(base_out, flat, bias, B, router, variant, k, scale)
        ctx.mark_dirty(base_out)
        ctx.save_for_backward(rows, v, alpha, c, B, router, flat)
        ctx.variant, ctx.scale = variant, scale
        return base_out

    @staticmethod
    def backward(ctx, grad_out):
        rows, v, alpha, c, B, router, flat = ctx.saved_tensors
        M, k, r = rows.shape
        scale = ctx.scale
        blocks = grad_out.reshape(-1, B.shape[0])  # [M f, d_out / f]
        grad_B = torch.mm(blocks.t(), v.view(-1, B.shape[1])).mul_(scale) if ctx.needs_input_grad[3] else None
        grad_v = torch.mm(blocks, B).view(M, r).mul_(scale)
        grad_alpha = torch.bmm(rows, grad_v.unsqueeze(-1)).squeeze(-1)  # [M, k]: <dL/dv, x_i>
        grad_rows, grad_router = ctx.variant.mix_backward(rows, router, alpha, c, grad_v, grad_alpha)
        grad_base = None
        if ctx.needs_input_grad[0]:
            grad_base = grad_out.clone(memory_format=torch.contiguous_format)
            grad_base.view(M, grad_base.shape[-1]).index_add_(1, flat, grad_rows.view(M, k * r))
        return grad_base, None, None, grad_B, grad_router.view_as(router), None, None, None


def adapted_output(base_out: torch.Tensor, flat: torch.Tensor, bias: Optional[torch.Tensor], B: torch.Tensor,
                   router: torch.Tensor, variant: RouterVariant, k: int, scale: float) -> torch.Tensor:
    """`base_out` with one adapter's update added in place: through `GatherMixAdd` when autograd records, by
    the same arithmetic without a graph otherwise. `base_out` must be contiguous and fresh from the base
    layer (nothing else may hold it); `bias` (the base bias at `flat`) must not need a gradient."""
    if torch.is_grad_enabled() and (base_out.requires_grad or B.requires_grad or router.requires_grad):
        return GatherMixAdd.apply(base_out, flat, bias, B, router, variant, k, scale)
    with torch.no_grad():  # as inside GatherMixAdd
        _forward_(base_out, flat, bias, B, router, variant, k, scale)
    return base_out
