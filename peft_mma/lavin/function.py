"""The decoder MM-adapter with per-sample routing as one autograd node (`lavin_mma.md` §2, §3; DESIGN decision 9).

    w   = softmax((W_m x₀ + b_m) / τ)                  x₀ = x[:, 0], the modality token; w: (B, 2)
    z   = Dropout(A x + a)                             (B, T, h)
    out = x + s·w0·(B z + b) + s·w1·(D z + d)          B, D: block-diagonal, g groups of (C/g × h/g)

computed as out = x + c_b + z U_b with the paths mixed in weight space per sample, U_b = s·(w0·B + w1·D) written out
as a dense (h, C) block-diagonal matrix (one batched matmul; at h = 8 the zero blocks cost less than regrouping z) and
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
        ups, biases = torch.stack([up0_w, up1_w]), torch.stack([up0_b, up1_b])  # (2, g, C/g, h/g), (2, C)
        ws = w * scale if scale != 1.0 else w
        mixed = (ws @ ups.flatten(1)).view(batch, groups, -1, part)  # U_b's blocks: (B, g, C/g, h/g)
        dense = x.new_zeros(batch, groups, part, groups, width // groups)  # U_b: (B, h, C), blocks on the diagonal
        dense.diagonal(dim1=1, dim2=3).copy_(mixed.permute(0, 3, 2, 1))
        dense = dense.view(batch, groups * part, width)
        c = ws @ biases  # c_b: (B, C)
        ctx.save_for_backward(x, t, z, keep, w, ws, dense, ups, biases, down_w, router_w)
        ctx.tau, ctx.scale, ctx.p, ctx.routed = tau, scale, p, given is None
        ctx.mark_non_differentiable(w)
        return torch.baddbmm(x + c[:, None], z, dense), w

    @staticmethod
    def backward(ctx, grad, _):
        x, t, z, keep, w, ws, dense, ups, biases, down_w, router_w = ctx.saved_tensors
        batch, length, width = x.shape
        groups, rows, part = ups.shape[1:]
        g_dense = torch.bmm(z.transpose(1, 2), grad)  # (B, h, C)
        g_mixed = g_dense.view(batch, groups, part, groups, rows).diagonal(dim1=1, dim2=3).permute(0, 3, 2, 1)
        g_mixed = g_mixed.reshape(batch, -1)  # the diagonal blocks, (B, g·C/g·h/g)
        g_z = torch.bmm(grad, dense.transpose(1, 2))  # (B, T, h)
        if keep is not None:
            g_z = torch.ops.aten.native_dropout_backward(g_z, keep, 1.0 / (1.0 - ctx.p))
        g_c = grad.sum(1)  # (B, C)
        g_ups = (ws.T @ g_mixed).view(ups.shape)  # (2, g, C/g, h/g)
        g_biases = ws.T @ g_c  # (2, C)
        g_x = grad + torch.matmul(g_z, down_w)  # (B, T, C): the identity path and A
        g_router_w = g_router_b = None
        if ctx.routed:
            g_ws = g_mixed @ ups.flatten(1).T + g_c @ biases.T  # (B, 2)
            g_w = g_ws * ctx.scale if ctx.scale != 1.0 else g_ws
            g_r = torch._softmax_backward_data(g_w, w, -1, w.dtype) / ctx.tau  # (B, 2): the router's logits
            g_x[:, 0] += g_r @ router_w  # the modality token feeds the router
            g_router_w, g_router_b = g_r.T @ t, g_r.sum(0)
        g_up0, g_up1 = g_ups.unbind(0)
        g_b0, g_b1 = g_biases.unbind(0)
        g_down_w, g_down_b = g_z.flatten(0, 1).T @ x.flatten(0, 1), g_z.sum((0, 1))
        return g_x, g_down_w, g_down_b, g_up0, g_b0, g_up1, g_b1, g_router_w, g_router_b, None, None, None, None
