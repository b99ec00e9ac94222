"""LaVIN's modality router and the modality token that feeds it (DESIGN.md decision 3, `lavin_mma.md` §3).

Officially a learnt modality token E_m[m] (m = 0 text, 1 image) sits at position 0 of every sequence and every
other token is masked from it, so its hidden state at layer l depends on m alone. Each MM-adapter routes the whole
sample from its own normalised input at that token:

    t_l(m) = Norm_l(h_l(m))                    # (C,) the adapter input at the modality token, layer l
    w_l(m) = softmax((W_m t_l(m) + b_m) / τ)    # (2,) per layer, per modality

Here the token is position 0 of the same model call (`lavin.inputs`): other tokens see it as padding, and its own
attention row is `modality_token_attention`, so it costs no extra pass through the decoder. The weights are computed
inside each adapter's autograd node, `lavin.function.RoutedAdapter`, which routes the vision encoder's adapters per
token from the same equation.
"""

from __future__ import annotations

import torch


def modality_token_attention(output: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The attention output with position 0, the modality token, attending to itself alone.

    A softmax over one key is 1, so the token's output is its own value: o_0 = v_0 per head (key/value heads
    repeated for their query heads, as in the base attention). Every other token has the modality token masked as
    padding, so the attention kernel already gives their rows; it gives row 0 nothing useful (all its keys are
    masked), and that row is replaced.

    Args:
        output: (B, S, H, d), the layout attention functions return.
        value: (B, H_kv, S_kv, d), with the modality token at key position 0.
    """
    heads, kv_heads = output.shape[2], value.shape[1]
    own = value[:, :, 0]  # (B, H_kv, d)
    if heads != kv_heads:
        own = own.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, d)
    return output.select_scatter(own if own.dtype == output.dtype else own.to(output.dtype), 1, 0)  # row 0 ← own
