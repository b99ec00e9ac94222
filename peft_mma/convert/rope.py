"""Meta → Hugging Face row order for everything indexed by query or key outputs (spec `llama_adapter_v2.md` §9).

Meta's LLaMA rotates interleaved pairs (x₀, x₁), (x₂, x₃), … of each head; Hugging Face's rotates the two halves
(x_i, x_{i+d/2}). Transformers' own conversion script therefore permutes the output rows of `wq` and `wk` per head:

    rows (h, i, p) → (h, p, i)          h < heads, i < d/2, p ∈ {0, 1}

Applied to a whole head of rows it maps the interleaved layout onto the rotate-half one, so q·k after RoPE is the
same number in both layouts. An adapter tensor that adds to q or k outputs needs the same permutation of its rows:
the q/k bias, the LoRA up-projection B of q/k, an output-side q/k scale. Input-side tensors (LoRA A, an input-side
scale) and everything on v and o are left as they are; head order is kept, so per-head gates need nothing.
"""

from __future__ import annotations

import torch

from .checkpoint import ConversionError


def meta_to_hf_rows(tensor: torch.Tensor, num_heads: int, head_dim: int, name: str = "tensor") -> torch.Tensor:
    """Permute dim 0 of `tensor` (heads·d rows, any trailing shape) from Meta's interleaved to HF's rotate-half order.

    For keys under grouped-query attention pass the number of key/value heads.
    """
    rows = tensor.shape[0]
    if rows != num_heads * head_dim or head_dim % 2:
        raise ConversionError(
            f"`{name}` has {rows} rows; a q/k tensor of the base needs {num_heads} heads × head_dim {head_dim} "
            f"(= {num_heads * head_dim}) rows with an even head_dim."
        )
    rest = tensor.shape[1:]
    grouped = tensor.reshape(num_heads, head_dim // 2, 2, *rest)  # (h, d/2, 2, …): Meta's pairs
    return grouped.transpose(1, 2).reshape(tensor.shape).contiguous()  # (h, 2, d/2, …) → HF halves
