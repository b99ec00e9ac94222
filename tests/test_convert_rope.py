"""The Meta → HF row permutation maps interleaved-RoPE attention scores onto HF's rotate-half ones (spec §9)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config
from reference.meta_layout_ref import rope
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from peft_mma.convert import ConversionError, meta_to_hf_rows


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_permuted_q_k_rows_give_the_meta_scores_under_hf_rope(kind):
    config = tiny_llama_config(kind)
    heads, kv_heads, d, c = config.num_attention_heads, config.num_key_value_heads, 8, config.hidden_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 11, c, generator=g)
    # everything that adds to q / k outputs, in Meta row order: W, bias, LoRA B (A is input-side)
    a = torch.randn(2, c, generator=g)
    wq, bq, bq_lora = (torch.randn(heads * d, *shape, generator=g) for shape in ((c,), (), (2,)))
    wk, bk, bk_lora = (torch.randn(kv_heads * d, *shape, generator=g) for shape in ((c,), (), (2,)))

    def project(w, b, lora_b):
        return x @ w.T + b + (x @ a.T) @ lora_b.T  # (1, T, n·d)

    # Meta: interleaved pairs, complex rotation
    q = rope(project(wq, bq, bq_lora).view(1, 11, heads, d), 10000.0).transpose(1, 2)  # (1, H, T, d)
    k = rope(project(wk, bk, bk_lora).view(1, 11, kv_heads, d), 10000.0).transpose(1, 2)  # (1, H_kv, T, d)
    meta = q @ k.repeat_interleave(heads // kv_heads, 1).transpose(-1, -2)  # (1, H, T, T)

    # HF: the same tensors with permuted rows, transformers' own rotate-half RoPE
    def hf(n, w, b, lora_b):
        rows = [meta_to_hf_rows(t, n, d) for t in (w, b, lora_b)]
        return project(*rows).view(1, 11, n, d).transpose(1, 2)  # (1, n, T, d)

    cos, sin = LlamaRotaryEmbedding(config)(x, torch.arange(11)[None])
    q_hf, k_hf = apply_rotary_pos_emb(hf(heads, wq, bq, bq_lora), hf(kv_heads, wk, bk, bk_lora), cos, sin)
    scores = q_hf @ k_hf.repeat_interleave(heads // kv_heads, 1).transpose(-1, -2)
    assert meta.abs().max() > 10  # not a vacuous comparison
    torch.testing.assert_close(scores, meta.float(), atol=1e-4, rtol=1e-6)


def test_permutation_is_per_head_and_refuses_a_wrong_row_count():
    rows = torch.arange(16.0)  # 2 heads × d = 8: Meta pairs (0,1), (2,3), … → HF halves
    expected = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15.0])
    assert torch.equal(meta_to_hf_rows(rows, 2, 8), expected)
    with pytest.raises(ConversionError, match=r"`wq.bias` has 12 rows; .*2 heads × head_dim 8"):
        meta_to_hf_rows(torch.zeros(12), 2, 8, "wq.bias")
