"""LaVIN's modality router and the modality token that feeds it (DESIGN.md decision 3, `lavin_mma.md` §3).

Officially a learnt modality token E_m[m] (m = 0 text, 1 image) sits at position 0 of every sequence and every
other token is masked from it, so its hidden state at layer l depends on m alone. Each MM-adapter routes the whole
sample from its own normalised input at that token:

    t_l(m) = Norm_l(h_l(m))                    # (C,) the adapter input at the modality token, layer l
    w_l(m) = softmax((W_m t_l(m) + b_m) / τ)    # (2,) per layer, per modality

Here the token is position 0 of the same model call (`lavin.inputs`), so it costs no extra pass through the decoder.
The attention kernel runs over the other tokens alone, with the caller's own mask (`without_modality_token`; none at
all for an unpadded batch, so the kernel stays causal and reads grouped key/value heads as they are), and the
token's own row goes in front (`modality_token_attention`). The weights are computed
inside each adapter's autograd node, `lavin.function.RoutedAdapter`, which routes the vision encoder's adapters per
token from the same equation.
"""

from __future__ import annotations

import torch


def modality_token_attention(output: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The attention output of a sequence that starts with the modality token: the other tokens' rows, from the
    kernel run without the token, and in front of them the token's own row.

    The token attends to itself alone, and a softmax over one key is 1, so its output is its own value: o_0 = v_0 per
    head (key/value heads repeated for their query heads, as in the base attention).

    Args:
        output: (B, S, H, d), the layout attention functions return, for positions 1..S.
        value: (B, H_kv, S_kv, d), with the modality token at key position 0.

    Returns:
        (B, 1 + S, H, d).
    """
    heads, kv_heads = output.shape[2], value.shape[1]
    own = value[:, :, 0]  # (B, H_kv, d)
    if heads != kv_heads:
        own = own.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, d)
    own = own if own.dtype == output.dtype else own.to(output.dtype)
    return torch.cat([own[:, None], output], dim=1)


def without_modality_token(mask, rows: int):
    """The attention mask of the other tokens: key position 0 (the modality token, which no other token attends to)
    dropped, and query row 0 when the queries hold the token (`rows` 1; 0 for decoding steps).

    None stays None (the kernel's own causal mask). A 4-D mask (B, 1, Q, K) (eager, sdpa) and a 2-D padding mask
    (B, K) (flash attention) are sliced; other masks (flex attention's `BlockMask`) are refused.
    """
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        return mask[:, :, rows:, 1:]
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask[:, 1:]
    raise ValueError(
        "LaVIN's learnt router keeps its modality token out of the other tokens' attention by slicing the attention "
        "mask, which must be a 4-D (eager, sdpa) or 2-D (flash attention) tensor or None; got "
        f"{type(mask).__name__}. Load the base with attn_implementation='sdpa', or use LaVINConfig(router='modality')."
    )
