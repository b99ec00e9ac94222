"""LLaMA-Adapter V2's trainable visual bridge (spec `llama_adapter_v2.md` §3, steps 2–5).

    f = LN_c(W_c F + b_c)                    F: (B, N, C_f) encoder tokens        → (B, N, C_v)
    h = Blocks([Q; f])[:, :K]                Q: (K, C_v) visual queries, N(0, 1)  → (B, K, C_v)
    V = LN_v(W_v h + b_v)                                                          → (B, K, C)

`Blocks` are `visual_depth` pre-norm timm ViT blocks (qkv bias, MLP ratio 4, LayerNorm ε = 1e-5 as in the official
code's timm 0.3.2 `Block`; timm 1.0's default is 1e-6). Parameter names follow the official
checkpoint (`clip_proj`, `clip_proj_norm`, `visual_query`, `visual_blocks`, `visual_proj`, `visual_proj_norm`).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

BLOCK_NORM = partial(nn.LayerNorm, eps=1e-5)  # the official blocks' norm (spec §3)


class AdapterV2VisualBridge(nn.Module):
    def __init__(
        self,
        feature_width: int,
        out_width: int,
        query_length: int = 10,
        width: int = 768,
        depth: int = 8,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.clip_proj = nn.Linear(feature_width, width, **kw)
        self.clip_proj_norm = nn.LayerNorm(width, **kw)
        self.visual_query = nn.Embedding(query_length, width, **kw)
        self.visual_blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, qkv_bias=True, norm_layer=BLOCK_NORM, device=device, dtype=dtype)
            for _ in range(depth)
        )
        self.visual_proj = nn.Linear(width, out_width, **kw)
        self.visual_proj_norm = nn.LayerNorm(out_width, **kw)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, C_f) encoder tokens → (B, K, C) visual tokens."""
        dtype = self.clip_proj.weight.dtype
        f = self.clip_proj_norm(self.clip_proj(features.to(dtype)))  # (B, N, C_v)
        queries = self.visual_query.weight[None].expand(f.shape[0], -1, -1)  # (B, K, C_v)
        h = torch.cat([queries, f], dim=1)  # (B, K + N, C_v)
        for block in self.visual_blocks:
            h = block(h)
        h = h[:, : queries.shape[1]]  # (B, K, C_v)
        return self.visual_proj_norm(self.visual_proj(h))  # (B, K, C)
