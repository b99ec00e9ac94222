"""A frozen linear layer with LLaMA-Adapter V2's bias and scale, as one autograd node (paper Eq. 1; spec §2d, §2e;
DESIGN decision 9).

    output side:  y = s ⊙ (W x + β)          input side:  y = W (s ⊙ x) + β          β = b₀ + b

W (and b₀) frozen; s and b trainable. Autograd would record the matmul, the bias, the scale and their casts as
separate nodes; on a GPU a training step is bound by dispatching ops, so one node whose backward computes exactly
the four products it needs is what the adapter costs. It keeps only tensors that its neighbours keep anyway (y on
the output side, which needs s without zero entries, as unmerging does; x on the input side). Values and gradients
are those of the formula (tests compare them with finite differences).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils import cast_to as _cast


def token_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over every dimension but the last, the tokens: (…, C) → (C,); a single vector (C,) is one token."""
    return t.sum(tuple(range(t.ndim - 1))) if t.ndim > 1 else t


class ScaledLinear(torch.autograd.Function):
    """`ScaledLinear.apply(x, W, β, s, output_side)` → y; x: (…, in), W: (out, in), β: (out,) or None, s: (out,)
    on the output side, (in,) on the input side. The result has x's dtype; W, s and β are cast to it (W and β are
    already in it unless autocast chose x's dtype, `utils.apply_in_autocast_dtype`), and s's and β's gradients back
    to their own dtypes."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, output_side: bool):
        weight, s, b = _cast(weight, x.dtype), _cast(scale, x.dtype), _cast(bias, x.dtype)
        if output_side:
            y = F.linear(x, weight, b) * s
            ctx.save_for_backward(y, weight, s)  # y, not W x + β: the next op keeps y anyway (no memory of our own)
        else:
            xs = x * s  # s ⊙ x
            y = F.linear(xs, weight, b)
            ctx.save_for_backward(x, weight, s)
        ctx.output_side, ctx.dtypes = output_side, (None if bias is None else bias.dtype, scale.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        saved, weight, s = ctx.saved_tensors
        bias_dtype, scale_dtype = ctx.dtypes
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if ctx.output_side:
            g_z = grad * s  # ∂L/∂(W x + β)
            g_scale = token_sum(grad * saved) / s  # Σ ∂L/∂y ⊙ (W x + β), from y = s ⊙ (W x + β)
            g_x = torch.matmul(g_z, weight) if need_x else None
            g_bias = token_sum(g_z) if need_bias else None
        else:
            g_xs = torch.matmul(grad, weight)  # ∂L/∂(s ⊙ x)
            g_x = g_xs * s if need_x else None
            g_scale = token_sum(g_xs * saved)  # (an einsum here is 25x slower on the CPU)
            g_bias = token_sum(grad) if need_bias else None
        return g_x, None, _cast(g_bias, bias_dtype), _cast(g_scale, scale_dtype), None


class OutputScale(torch.autograd.Function):
    """y = s ⊙ z that keeps y, not z, for backward: ∂L/∂s = Σ (∂L/∂y ⊙ y) / s, ∂L/∂z = ∂L/∂y ⊙ s. The output-side
    scale of a linear layer that also has LoRA or several adapters (`ScaledLinear` covers the common case).

    The next op usually keeps y itself (SiLU keeps the gate output, the MLP product the up output, attention v), so
    the scale then costs no activation memory of its own. Needs s without zero entries, as `Linear.unmerge` does.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        y = z * s
        ctx.save_for_backward(y, s)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        y, s = ctx.saved_tensors
        grad_z = grad * s if ctx.needs_input_grad[0] else None
        grad_s = token_sum(grad * y) / s if ctx.needs_input_grad[1] else None
        return grad_z, grad_s


class TunedRMSNorm(torch.autograd.Function):
    """`TunedRMSNorm.apply(x, w, ε)` → y = w ⊙ n(x),  n(x) = x / √(mean(x²) + ε): LlamaRMSNorm's own computation (in
    fp32, or fp64 for fp64 x; n cast back to x's dtype) with a trainable weight w = w₀ + Δ (spec §2f).

    Autograd would keep n(x) for ∂L/∂w, a tensor of the residual stream's size per norm that no other op keeps. This
    node keeps x (which the norm's own backward needs anyway) and 1 / √(mean(x²) + ε), one value per token, and
    recomputes n(x) with one product in backward:

        ∂L/∂w = Σ_tokens g ⊙ n,    ∂L/∂x = r ⊙ (g_n − n ⊙ mean(g_n ⊙ n)),   g_n = g ⊙ w,  r = 1 / √(mean(x²) + ε)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = _cast(x, torch.promote_types(x.dtype, torch.float32))
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # (…, 1)
        ctx.save_for_backward(x, r, weight)
        return _cast(weight * _cast(h * r, x.dtype), x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, r, weight = ctx.saved_tensors
        n = _cast(x, r.dtype) * r  # n(x) in fp32, recomputed
        g_weight = None
        if ctx.needs_input_grad[1]:
            g_weight = token_sum(_cast(grad, r.dtype) * _cast(n, x.dtype))  # summed in fp32
            g_weight = _cast(g_weight, weight.dtype)
        g_n = _cast(grad * weight, r.dtype)
        g_x = r * (g_n - n * (g_n * n).mean(-1, keepdim=True))
        return _cast(g_x, x.dtype), g_weight, None
