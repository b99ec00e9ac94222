"""Gated prompt attention added to the model's own attention (spec `llama_adapter_v2.md` §2c, DESIGN decision 2).

For a prompted layer, per head h and with the query q the attention already computed (after bias, LoRA and RoPE):

    o_h ← o_h + a(g_h) · ν · softmax(q_h k_pᵀ / √d) v_p            k_p = W_k P,  v_p = W_v P   (P: K × C)

a separate softmax over the K prompt keys (no mask, no RoPE), added *before* `o_proj`. The term is computed in an
attention function registered with transformers' `AttentionInterface` that wraps the configured implementation
(eager, sdpa, flash, …), so the query is never recomputed and the base attention kernel is untouched.

Which prompts a layer has is asked of its `o_proj`: a module there with a `gated_prompt_term(attention, query,
state)` method returns the term (the prompts are an input-side term of `o_proj`). Per-call state (visual tokens,
the prompt K/V cache of a `generate` call) arrives as the forward keyword `STATE_KWARG`, which transformers passes
from `LlamaForCausalLM.forward` down to every attention call, also when activation checkpointing recomputes a layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

STATE_KWARG = "mma_prompt_state"
SUFFIX = "+mma_prompt"


def gated_prompt_attention(
    query: torch.Tensor, prompt_key: torch.Tensor, prompt_value: torch.Tensor, gate: torch.Tensor, scaling: float
) -> torch.Tensor:
    """gate_h · softmax(q_h k_pᵀ · scaling) v_p for every head h.

    Args:
        query: (B, H, T, d), after RoPE.
        prompt_key, prompt_value: (B or 1, H_kv, K, d); grouped-query heads are shared as in the base attention.
        gate: (H,), the activated gate a(g) (times ν where present).
    Returns:
        (B, T, H, d), the layout attention functions return.
    """
    key, value = gated_prompt_key_value(prompt_key, prompt_value, gate, query.shape[1], query.dtype)
    return prompt_attention(query, key, value, scaling)


def gated_prompt_key_value(
    prompt_key: torch.Tensor, prompt_value: torch.Tensor, gate: torch.Tensor, heads: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head prompt keys and gated values, (B or 1, H, K, d) each, in `dtype`.

    The gate moves onto the values, g_h · softmax(q k_pᵀ) v_p = softmax(q k_pᵀ)(g_h v_p), so that it costs K rows
    once per call instead of a pass over (B, H, T, d) per layer and step; grouped-query heads are repeated as in
    transformers' `repeat_kv` (query head h reads key/value head h // (H / H_kv)).
    """
    groups = heads // prompt_key.shape[1]
    key, value = prompt_key.to(dtype), prompt_value.to(dtype)
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return key, value * gate.to(dtype).view(1, heads, 1, 1)


def prompt_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """softmax(q kᵀ · scaling) v with no mask: query (B, H, T, d), key/value (B or 1, H, K, d) → (B, T, H, d)."""
    batch = query.shape[0]
    if key.shape[0] != batch:
        key, value = key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)
    return F.scaled_dot_product_attention(query, key, value, scale=scaling).transpose(1, 2)


def _with_prompts(base_name: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        state = kwargs.pop(STATE_KWARG, None)
        base = ALL_ATTENTION_FUNCTIONS.get(base_name, eager_attention_forward)  # a Mapping in every 5.x
        output, weights = base(module, query, key, value, attention_mask, **kwargs)
        prompt_term = getattr(module.o_proj, "gated_prompt_term", None)
        if prompt_term is not None:
            term = prompt_term(module, query, state)
            if term is not None:
                output = output + term.to(output.dtype)
        return output, weights

    attention.__name__ = f"prompt_attention_{base_name}"
    return attention


def install_prompt_attention(config) -> None:
    """Point `config._attn_implementation` at the prompted wrapper of its current implementation (idempotent)."""
    base_name = config._attn_implementation or "eager"
    if base_name.endswith(SUFFIX):
        return
    name = base_name + SUFFIX
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _with_prompts(base_name))
        mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base_name)
        if mask is not None:
            AttentionMaskInterface.register(name, mask)
    config._attn_implementation = name


def uninstall_prompt_attention(config) -> None:
    """Restore the implementation `install_prompt_attention` wrapped."""
    name = config._attn_implementation
    if name is not None and name.endswith(SUFFIX):
        config._attn_implementation = name.removesuffix(SUFFIX)
