"""The decoder MM-adapter with per-sample routing as one autograd node (`lavin_mma.md` §2, §3; DESIGN decision 9).

    w   = softmax((W_m x₀ + b_m) / τ)                  x₀ = x[:, 0], the modality token; w: (B, 2)
    z   = Dropout(A x + a)                             (B, T, h)
    out = x + s·w0·(B z + b) + s·w1·(D z + d)          B, D: block-diagonal, g groups of (C/g × h/g)

computed as out = x + z U_b + c_b with the paths mixed in weight space per sample, U_b = s·(w0·B + w1·D) and
c_b = s·(w0·b + w1·d), and differentiated by hand. Autograd would record some twenty nodes per layer for this; on a
GPU a training step is bound by dispatching ops, so one node with a short backward is what the adapter costs. The
values and gradients are those of the plain formula (tests compare them with autograd's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RoutedAdapter(torch.autograd.Function):
    """`RoutedAdapter.apply(x, A, a, B, b, D, d, W_m, b_m, τ, s, p, given)` → (out (B, T, C), w (B, 2)); shapes as in
    the module docstring, B and D grouped as (g, C/g, h/g), p the dropout probability in training (0: none).

    `given` (B, 2): routing weights to use instead of routing from x[:, 0] (decoding steps, which hold no modality
    token); then W_m and b_m get no gradient. `w` is returned for the call to keep, and is not differentiable.
    """

    @staticmethod
    def forward(ctx, x, down_w, down_b, up0_w, up0_b, up1_w, up1_b, router_w, router_b, tau, scale, p, given):
        batch, length, width = x.shape
        groups, _, part = up0_w.shape
        t = x[:, 0]  # (B, C): the modality token
        if given is None:  # route from it
            w = torch.softmax(F.linear(t, router_w, router_b) / tau, dim=-1)  # (B, 2)
        else:
            w = given if given.dtype == x.dtype else given.to(x.dtype)
        z = F.linear(x, down_w, down_b)  # (B, T, h)
        keep = None
        if p > 0:
            z, keep = torch.native_dropout(z, p, True)
        z = z.view(batch, length, groups, part)  # (B, T, g, h/g)
        ups, biases = torch.stack([up0_w, up1_w]), torch.stack([up0_b, up1_b])  # (2, g, C/g, h/g), (2, C)
        ws = w * scale if scale != 1.0 else w
        mixed = torch.einsum("bp,pgjk->bgjk", ws, ups)  # U_b: (B, g, C/g, h/g)
        c = torch.einsum("bp,pc->bc", ws, biases)  # c_b: (B, C)
        y = torch.einsum("btgk,bgjk->btgj", z, mixed).reshape(batch, length, width)  # (B, T, C)
        ctx.save_for_backward(x, t, z, keep, w, ws, mixed, ups, biases, down_w, router_w)
        ctx.tau, ctx.scale, ctx.p, ctx.routed = tau, scale, p, given is None
        ctx.mark_non_differentiable(w)
        return x + y + c[:, None], w

    @staticmethod
    def backward(ctx, grad, _):
        x, t, z, keep, w, ws, mixed, ups, biases, down_w, router_w = ctx.saved_tensors
        batch, length, groups, _ = z.shape
        g = grad.view(batch, length, groups, -1)  # (B, T, g, C/g)
        g_mixed = torch.einsum("btgj,btgk->bgjk", g, z)  # (B, g, C/g, h/g)
        g_z = torch.einsum("btgj,bgjk->btgk", g, mixed).reshape(batch, length, -1)  # (B, T, h)
        if keep is not None:
            g_z = torch.ops.aten.native_dropout_backward(g_z, keep, 1.0 / (1.0 - ctx.p))
        g_c = grad.sum(1)  # (B, C)
        g_ups = torch.einsum("bp,bgjk->pgjk", ws, g_mixed)  # (2, g, C/g, h/g)
        g_biases = torch.einsum("bp,bc->pc", ws, g_c)  # (2, C)
        g_x = grad + torch.matmul(g_z, down_w)  # (B, T, C): the identity path and A
        g_router_w = g_router_b = None
        if ctx.routed:
            g_ws = torch.einsum("bgjk,pgjk->bp", g_mixed, ups) + torch.einsum("bc,pc->bp", g_c, biases)  # (B, 2)
            g_w = g_ws * ctx.scale if ctx.scale != 1.0 else g_ws
            g_r = torch._softmax_backward_data(g_w, w, -1, w.dtype) / ctx.tau  # (B, 2): the router's logits
            g_x[:, 0] += torch.matmul(g_r, router_w)  # the modality token feeds the router
            g_router_w, g_router_b = torch.einsum("bp,bc->pc", g_r, t), g_r.sum(0)
        g_up0, g_up1 = g_ups.unbind(0)
        g_b0, g_b1 = g_biases.unbind(0)
        g_down_w, g_down_b = torch.einsum("bth,btc->hc", g_z, x), g_z.sum((0, 1))
        return g_x, g_down_w, g_down_b, g_up0, g_b0, g_up1, g_b1, g_router_w, g_router_b, None, None, None, None
