"""LaVIN's modality router and the one-token side pass that feeds it (DESIGN.md decision 3, `lavin_mma.md` §3).

Officially a learnt modality token E_m[m] (m = 0 text, 1 image) sits at position 0 of every sequence and every
other token is masked from it. Its hidden state at layer l therefore depends on m alone, and each MM-adapter routes
the whole sample from its own normalised input at that token:

    t_l(m) = Norm_l(h_l(m))                    # (C,) the adapter input at the modality token, layer l
    w_l(m) = softmax((W_m t_l(m) + b_m) / τ)    # (2,) per layer, per modality

`modality_side_pass` computes the same t_l by running E_m alone (length 1, position 0, where RoPE is the identity)
through the adapted decoder layers, so the text itself needs no extra token and no custom mask.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import Cache

SELF_ROUTED = "self"  # `lavin_routing` value: each adapter routes from its own input at position 0


def route(router: nn.Linear, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """w = softmax(router(t) / τ): (..., C) → (..., 2)."""
    return torch.softmax(router(t) / temperature, dim=-1)


def lone_token_attention(attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A LLaMA self-attention over sequences of one token each, with no cache: (M, 1, C) → (M, 1, C).

    The token attends only to itself, and a softmax over one key is exactly 1, so

        Attn(x) = W_o · repeat_kv(W_v x)      (each key/value head repeated for its group of query heads)

    whatever q, k and RoPE are; they get no gradient from it either. The side pass uses this in place of the full
    attention, which would compute q, k, RoPE and the attention kernel only to multiply v by 1. Calling the
    module's own `v_proj` and `o_proj` keeps whatever they are (quantized, biased, adapted).
    """
    v = attention.v_proj(x)  # (M, 1, kv_heads · d)
    groups = attention.num_key_value_groups
    if groups > 1:
        v = v.unflatten(-1, (-1, attention.head_dim)).repeat_interleave(groups, dim=-2).flatten(-2)
    return attention.o_proj(v)


def is_lone_token_attention(attention: nn.Module, x: torch.Tensor, kwargs: dict) -> bool:
    """Whether `lone_token_attention` computes exactly what `attention(x, **kwargs)` would: a LLaMA attention with
    no attention dropout in play, sequences of length one, and no mask or cache that could add other keys."""
    llama_like = all(hasattr(attention, a) for a in ("v_proj", "o_proj", "num_key_value_groups", "head_dim"))
    dropout = attention.training and getattr(attention, "attention_dropout", 0.0) > 0
    extra = kwargs.get("attention_mask") is not None or any(isinstance(v, Cache) for v in kwargs.values())
    return llama_like and not dropout and not extra and x.shape[-2] == 1


def modality_side_pass(
    model: nn.Module, tokens: torch.Tensor, recorders: Iterable[nn.Module]
) -> dict[nn.Module, dict[str, torch.Tensor]]:
    """Run the modality tokens `tokens` (M, C) alone through the decoder of `model` (a `LlamaForCausalLM`).

    Every module in `recorders` (an MM-adapter layer) routes from its own input at the token and records its
    weights; returns {layer: {adapter name: (M, 2) weights}}. Only the layers up to the last recorder run.
    """
    recorders = list(recorders)
    inner = model.model
    layers = list(inner.layers)
    owners = [i for i, layer in enumerate(layers) if any(r in set(layer.modules()) for r in recorders)]
    reference = inner.embed_tokens.weight
    h = tokens.to(reference.dtype)[:, None, :]  # (M, 1, C)
    position_ids = torch.zeros(h.shape[:2], dtype=torch.long, device=h.device)  # (M, 1)
    position_embeddings = inner.rotary_emb(h, position_ids)
    for recorder in recorders:
        recorder.lavin_record = {}
    try:
        for layer in layers[: max(owners, default=-1) + 1]:
            # passed as a kwarg, so gradient checkpointing replays it when it recomputes the layer
            h = layer(
                h,
                attention_mask=None,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                lavin_routing=SELF_ROUTED,
            )
        return {recorder: recorder.lavin_record for recorder in recorders}
    finally:
        for recorder in recorders:
            recorder.lavin_record = None
