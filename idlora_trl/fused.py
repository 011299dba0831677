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

`mix` is the one implementation of the router; the layer's general path (several adapters, half-precision
bases, dropout) runs it under ordinary autograd. Tests compare both paths, and their gradients, with dense
references written independently (tests/test_layer.py, tests/test_fused.py).
"""

from __future__ import annotations

from typing import Optional

import torch

RMS_EPS = 1e-12  # keeps rsqrt finite for an all-zero token (its alpha is 0 then: <T, 0> = 0)


def mix(rows: torch.Tensor, weight: torch.Tensor, static: bool,
        rms: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """`(v, alpha, c)` from the gathered skeleton outputs `rows` (`[M, k, r]`).

    `weight` is the router's: `[k]` for the static router, `[r]` (T) for the token router. `alpha` is `[k]`
    (static) or `[M, k]`; `c` (`[M, 1]`) is the rms normaliser, `None` without it. Differentiable.
    """
    M, k, r = rows.shape  # explicit mv / bmm: torch.matmul picks its kernels by requires_grad (other bits)
    if static:
        return torch.bmm(weight.view(1, 1, k).expand(M, 1, k), rows).view(M, r), weight, None
    alpha = torch.mv(rows.reshape(M * k, r), weight).view(M, k)  # <T, x_i>
    c = None
    if rms:
        c = torch.rsqrt(rows.square().mean(dim=(-2, -1)).unsqueeze(-1) * r + RMS_EPS)
        alpha = alpha * c
    return torch.bmm(alpha.unsqueeze(1), rows).view(M, r), alpha, c  # one [1, k] x [k, r] product per token


def _forward_(base_out: torch.Tensor, flat: torch.Tensor, bias: Optional[torch.Tensor], B: torch.Tensor,
              router: torch.Tensor, static: bool, rms: bool, k: int, scale: float):
    """Adds the update into `base_out` (contiguous, float32) in place; returns what the backward needs."""
    width = B.shape[1]  # r / f
    gathered = base_out.view(-1, base_out.shape[-1]).index_select(1, flat)  # [M, k r], a new tensor
    if bias is not None:
        gathered.sub_(bias)
    rows = gathered.view(gathered.shape[0], k, flat.numel() // k)
    v, alpha, c = mix(rows, router.view(-1), static, rms)
    base_out.view(-1, B.shape[0]).addmm_(v.view(-1, width), B.t(), alpha=scale)
    return rows, v, alpha, c


class GatherMixAdd(torch.autograd.Function):
    """`out = Y + s * concat_j(B v_j)` with `v` gathered from `Y` itself, `Y` updated in place (marked dirty)."""

    @staticmethod
    def forward(ctx, base_out, flat, bias, B, router, static, rms, k, scale):
        rows, v, alpha, c = _forward_(base_out, flat, bias, B, router, static, rms, k, scale)
        ctx.mark_dirty(base_out)
        ctx.save_for_backward(rows, v, alpha, c, B, router, flat)
        ctx.static, ctx.scale = static, scale
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
        if ctx.static:
            grad_rows = alpha.view(1, k, 1) * grad_v.unsqueeze(1)
            grad_router = grad_alpha.sum(0)
        else:
            grad_rows = alpha.unsqueeze(-1) * grad_v.unsqueeze(1)  # through v = sum_i alpha_i x_i
            grad_a = grad_alpha if c is None else grad_alpha * c  # alpha = a c, a = <T, x_i>
            grad_router = torch.mm(grad_a.view(1, M * k), rows.view(M * k, r)).view_as(router)
            grad_rows.add_(grad_a.unsqueeze(-1) * router.view(1, 1, r))
            if c is not None:  # dc/dx = -c^3 x / k (c = rsqrt(sum(x^2) / k + eps))
                grad_c = (grad_alpha * alpha).sum(-1, keepdim=True) / c  # sum_i dL/dalpha_i a_i
                grad_rows.add_(rows * (grad_c * c.pow(3) / -k).unsqueeze(-1))
        grad_base = None
        if ctx.needs_input_grad[0]:
            grad_base = grad_out.clone(memory_format=torch.contiguous_format)
            grad_base.view(M, grad_base.shape[-1]).index_add_(1, flat, grad_rows.view(M, k * r))
        return grad_base, None, None, grad_B, grad_router, None, None, None, None


def adapted_output(base_out: torch.Tensor, flat: torch.Tensor, bias: Optional[torch.Tensor], B: torch.Tensor,
                   router: torch.Tensor, static: bool, rms: bool, k: int, scale: float) -> torch.Tensor:
    """`base_out` with one adapter's update added in place: through `GatherMixAdd` when autograd records, by
    the same arithmetic without a graph otherwise. `base_out` must be contiguous and fresh from the base
    layer (nothing else may hold it); `bias` (the base bias at `flat`) must not need a gradient."""
    if torch.is_grad_enabled() and (base_out.requires_grad or B.requires_grad or router.requires_grad):
        return GatherMixAdd.apply(base_out, flat, bias, B, router, static, rms, k, scale)
    with torch.no_grad():  # as inside GatherMixAdd
        _forward_(base_out, flat, bias, B, router, static, rms, k, scale)
    return base_out
