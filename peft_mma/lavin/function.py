"""The MM-adapter with its routing as one autograd node (`lavin_mma.md` §2, §3; DESIGN decision 9).

    w   = softmax((W_m t + b_m) / τ)                   t: the routing input (below); w: (B, 2) or (B, T, 2)
    z   = Dropout(A x + a)                             (B, T, h)
    out = x + s·w0·(B z + b) + s·w1·(D z + d)          B, D: block-diagonal, g groups of (C/g × h/g)

Routing input t: the modality token x[:, 0] of each sample in the decoder (one weight pair per sample), every token
x itself in the vision encoder (one pair per token).

Both paths written as one (r, C) matrix each, P_i = [B_denseᵀ; bᵀ; 0] and [D_denseᵀ; dᵀ; 0] (the block-diagonal
matrix, the bias as row h, zero without biases, and zero rows up to r), and z with columns of ones, z̄ = [z, 1, …, 1]
(B, T, r):

    out = x + s·w0·(z̄ P_0) + s·w1·(z̄ P_1)

    per sample:  out = x + z̄ U_b,        U_b = s·(w0·P_0 + w1·P_1)   mixed in weight space, one batched matmul
    per token:   out = x + [s·w0·z̄, s·w1·z̄] [P_0; P_1]               mixed in activation space, one matmul

r = `path_rows(h)` is h + 1 rounded up to a multiple of `ROW_MULTIPLE` (8): the matmuls' inner dimension, and the
row length of z̄, then span a whole number of 16-byte words in half precision, which cuBLAS's fast kernels need
(with r = h + 1 = 9 every one of them falls back to kernels for unaligned operands).

P = (P_0, P_1) is gathered from the four parameters in one `take` (`paths`), and its gradient scattered back in one
(`path_grads`). Autograd would record some twenty nodes per adapter for this; on a GPU a training step is bound by
dispatching ops, so one node with a short, hand-written backward is what the adapter costs. The values and gradients
are those of the plain formula (tests compare them with autograd's and with finite differences).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from ..utils import cast_to

ROW_MULTIPLE = 8


def path_rows(hidden: int) -> int:
    """r: the rows of each P_i and the columns of z̄, h + 1 rounded up to a multiple of `ROW_MULTIPLE`."""
    return -(-(hidden + 1) // ROW_MULTIPLE) * ROW_MULTIPLE


def with_ones(z: torch.Tensor) -> torch.Tensor:
    """z̄ = [z, 1, …, 1]: (…, h) → (…, r); the first column of ones meets the biases' row of P, the others its
    zero rows."""
    return F.pad(z, (0, path_rows(z.shape[-1]) - z.shape[-1]), value=1.0)


@lru_cache(maxsize=64)
def _layout(
    groups: int, part: int, width: int, rows: int, bias: bool, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tensors between the packed parameters and P (2, r·C), r = `rows`, for g groups of (C/g × h/g) blocks,
    h = g·part.

    The packed source is src = [B.flatten(), D.flatten(), b, d, 0] (length 2n + 2C + 1, n = C·h/g, B's entries;
    without biases [B.flatten(), D.flatten(), 0], and P's row h is zero): `gather` (2, r·C) picks P's entries from
    it (the last, zero, entry for the off-diagonal blocks and the rows after h); `scatter` (2n [+ 2C],) is where
    each parameter entry sits in the flattened P, so ∂src = ∂P.take(scatter); `zero` (1,) is src's last entry.
    """
    hidden, block = groups * part, width // groups
    group, row, k = torch.meshgrid(torch.arange(groups), torch.arange(block), torch.arange(part), indexing="ij")
    weight_at = (group * part + k) * width + group * block + row  # W[g, j, k] sits at P[g·part + k, g·C/g + j]
    size = rows * width
    bias_at = hidden * width + torch.arange(width)  # b sits in P's row h
    parts = [weight_at.flatten(), size + weight_at.flatten()] + ([bias_at, size + bias_at] if bias else [])
    scatter = torch.cat(parts)
    gather = torch.full((2 * size,), len(scatter), dtype=torch.long)
    gather[scatter] = torch.arange(len(scatter))
    return gather.view(2, size).to(device), scatter.to(device), torch.zeros(1, device=device, dtype=dtype)


@torch.compiler.assume_constant_result
def _constant_layout(
    groups: int, part: int, width: int, rows: int, bias: bool, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_layout`, which `torch.compile` takes as a constant: the compiled graph holds the index tensors instead of
    building them again on every call (and Dynamo does not trace through the `lru_cache`)."""
    return _layout(groups, part, width, rows, bias, device, dtype)


def paths(up0_w, up0_b, up1_w, up1_b) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, scatter): P = (P_0, P_1) flattened, (2, r·C), from B, b, D, d (b, d may be None: zero);
    `scatter` for `path_grads`."""
    groups, block, part = up0_w.shape
    bias, rows = up0_b is not None, path_rows(groups * part)
    gather, scatter, zero = _constant_layout(groups, part, groups * block, rows, bias, up0_w.device, up0_w.dtype)
    src = [up0_w.flatten(), up1_w.flatten()] + ([up0_b, up1_b] if bias else []) + [zero]
    return torch.cat(src).take(gather), scatter


def path_grads(g_paths: torch.Tensor, scatter: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor | None, ...]:
    """∂B, ∂b, ∂D, ∂d from ∂P (2, r·C): the entries of P that are parameters, in `paths`' order (∂b and ∂d
    None where P has no biases)."""
    n = shape.numel()
    flat = g_paths.take(scatter)
    if len(scatter) == 2 * n:  # no biases
        g_up0, g_up1 = flat.split([n, n])
        return g_up0.view(shape), None, g_up1.view(shape), None
    width = g_paths.shape[1] // path_rows(shape[0] * shape[2])
    g_up0, g_up1, g_b0, g_b1 = flat.split([n, n, width, width])
    return g_up0.view(shape), g_b0, g_up1.view(shape), g_b1


def mixed_per_sample(ws: torch.Tensor, packed: torch.Tensor, width: int) -> torch.Tensor:
    """U_b = s·(w0·P_0 + w1·P_1) of every sample, (B, r, C), from ws = s·w (B, 2) and P (2, r·C); the
    adapter is then out = x + z̄ U_b, one `baddbmm`."""
    return (ws @ packed).view(len(ws), -1, width)


class RoutedAdapter(torch.autograd.Function):
    """`RoutedAdapter.apply(x, A, a, B, b, D, d, W_m, b_m, τ, s, p, per_token, given)` → (out (B, T, C), w); shapes
    as in the module docstring, B and D grouped as (g, C/g, h/g), b and d None for an adapter without them, p the
    dropout probability in training (0: none).

    `per_token`: route every token from itself (w: (B, T, 2)), else each sample from x[:, 0] (w: (B, 2)).
    `given`: routing weights to use instead of routing (decoding steps, which hold no modality token, and the fixed
    weights of `router="modality"`, whose adapters have no router: W_m and b_m None); then W_m and b_m get no
    gradient. `w` is returned for the call to keep, and is not differentiable.

    The node computes in x's dtype, as `torch.autocast` would: the parameters (float32 by PEFT's default) are cast
    to it, their gradients back to their own dtypes. In a bfloat16 model the activations (B, T, C) thus never take
    a float32 round trip: that doubled the adapter's memory traffic and kept its matmuls off the tensor cores.
    """

    @staticmethod
    def forward(ctx, x, down_w, down_b, up0_w, up0_b, up1_w, up1_b, router_w, router_b, tau, scale, p, per_token,
                given):  # fmt: skip
        width, dtype = x.shape[-1], x.dtype
        ctx.dtypes = [None if t is None else t.dtype for t in (down_w, down_b, up0_w, up0_b, router_w, router_b)]
        down_w, down_b, router_w, router_b = (cast_to(t, dtype) for t in (down_w, down_b, router_w, router_b))
        t = x if per_token else x[:, 0]  # the routing input: (B, T, C) or (B, C)
        if given is None:
            w = torch.softmax(F.linear(t, router_w, router_b) / tau, dim=-1)
        else:
            w = cast_to(given, dtype)
        z = F.linear(x, down_w, down_b)  # (B, T, h)
        keep = None
        if p > 0:
            z, keep = torch.native_dropout(z, p, True)
        z1 = with_ones(z)  # z̄ = [z, 1, …, 1]: (B, T, r)
        packed, scatter = paths(up0_w, up0_b, up1_w, up1_b)  # (2, r·C)
        packed = cast_to(packed, dtype)
        ws = w * scale if scale != 1.0 else w
        if per_token:
            mixed = (ws.unsqueeze(-1) * z1.unsqueeze(-2)).flatten(-2)  # [s·w0·z̄, s·w1·z̄]: (B, T, 2r)
            stacked = packed.view(-1, width)  # [P_0; P_1]: (2r, C)
            out = x + mixed @ stacked
            saved = (mixed, stacked)
        else:
            mixed = mixed_per_sample(ws, packed, width)  # U_b: (B, r, C)
            out = torch.baddbmm(x, z1, mixed)
            saved = (mixed, packed)
        ctx.save_for_backward(x, t, z1, keep, w, ws, *saved, scatter, down_w, router_w)
        ctx.set_materialize_grads(False)  # `w` gets no gradient: no zeros for it
        ctx.tau, ctx.scale, ctx.p, ctx.per_token, ctx.routed = tau, scale, p, per_token, given is None
        ctx.up_shape = up0_w.shape
        ctx.mark_non_differentiable(w)
        return out, w

    @staticmethod
    def backward(ctx, grad, _):
        if grad is None:  # `out` took no part in the loss
            return (None,) * 14
        x, t, z1, keep, w, ws, mixed, packed, scatter, down_w, router_w = ctx.saved_tensors
        hidden = down_w.shape[0]
        if ctx.per_token:  # mixed: [s·w0·z̄, s·w1·z̄] (B, T, 2r); packed: [P_0; P_1] (2r, C)
            g_packed = (mixed.flatten(0, 1).T @ grad.flatten(0, 1)).view(2, -1)
            g_mixed = F.linear(grad, packed).unflatten(-1, (2, -1))  # grad @ packedᵀ: (B, T, 2, r)
            g_z = (g_mixed * ws.unsqueeze(-1)).sum(-2)[..., :hidden]
            g_ws = (g_mixed * z1.unsqueeze(-2)).sum(-1) if ctx.routed else None  # (B, T, 2)
        else:  # mixed: U_b (B, r, C); packed: (P_0, P_1) (2, r·C)
            g_mixed = torch.bmm(z1.transpose(1, 2), grad).flatten(1)  # (B, r·C)
            g_packed = ws.T @ g_mixed
            g_z = torch.bmm(grad, mixed[:, :hidden].transpose(1, 2))  # (B, T, h)
            g_ws = F.linear(g_mixed, packed) if ctx.routed else None  # g_mixed @ packedᵀ: (B, 2)
        if keep is not None:
            g_z = torch.ops.aten.native_dropout_backward(g_z, keep, 1.0 / (1.0 - ctx.p))
        g_x = grad + g_z @ down_w  # (B, T, C): the identity path and A
        g_router_w = g_router_b = None
        if ctx.routed:
            g_w = g_ws * ctx.scale if ctx.scale != 1.0 else g_ws
            g_r = torch._softmax_backward_data(g_w, w, -1, w.dtype) / ctx.tau  # the router's logits
            if ctx.per_token:
                g_x = g_x + g_r @ router_w  # every token feeds its own router
                g_router_w, g_router_b = torch.tensordot(g_r, t, ([0, 1], [0, 1])), g_r.sum((0, 1))
            else:
                g_x.select(1, 0).addmm_(g_r, router_w)  # the modality token feeds the router
                g_router_w, g_router_b = g_r.T @ t, g_r.sum(0)
        g_down_w, g_down_b = torch.tensordot(g_z, x, ([0, 1], [0, 1])), g_z.sum((0, 1))  # Σ over (B, T)
        down_dtype, down_b_dtype, up_dtype, up_b_dtype, router_dtype, router_b_dtype = ctx.dtypes
        g_up0, g_b0, g_up1, g_b1 = path_grads(cast_to(g_packed, up_dtype), scatter, ctx.up_shape)
        return (g_x, cast_to(g_down_w, down_dtype), cast_to(g_down_b, down_b_dtype), g_up0, cast_to(g_b0, up_b_dtype),
                g_up1, cast_to(g_b1, up_b_dtype), cast_to(g_router_w, router_dtype),
                cast_to(g_router_b, router_b_dtype), None, None, None, None, None)  # fmt: skip
