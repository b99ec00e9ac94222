"""An independent reference for LaVIN, written from the equations of `lavin_mma.md` §2–§4 (not from peft_mma).

It reproduces the *official* formulation: the modality token E_m[m] is prepended at position 0, every other token
is masked from it (`mask[:, :, 1:, 0] = -inf`), and each MM-adapter routes the whole sample from its own input at
position 0. Adapter weights are plain tensors; the block-diagonal up-projections are built element by element.
"""

from __future__ import annotations

import torch


def dense_up(weight: torch.Tensor) -> torch.Tensor:
    """(g, C/g, h/g) grouped weight → (C, h) dense block-diagonal matrix (conv_B with groups=g)."""
    g, cg, hg = weight.shape
    rows = []
    for group in range(g):
        for j in range(cg):
            row = [torch.zeros((), dtype=weight.dtype)] * (g * hg)
            for k in range(hg):
                row[group * hg + k] = weight[group, j, k]
            rows.append(torch.stack(row))
    return torch.stack(rows)


def adapter_tensors(layer, name: str = "default", detach: bool = True) -> dict[str, torch.Tensor]:
    """Read one adapter's raw tensors out of a peft_mma MM-adapter layer (attached to autograd if not `detach`)."""

    def read(t: torch.Tensor) -> torch.Tensor:
        return t.detach() if detach else t

    return dict(
        A=read(layer.mma_lavin_down[name].weight),
        a=read(layer.mma_lavin_down[name].bias),
        B=dense_up(read(layer.mma_lavin_up0[name].weight)),
        b=read(layer.mma_lavin_up0[name].bias),
        D=dense_up(read(layer.mma_lavin_up1[name].weight)),
        d=read(layer.mma_lavin_up1[name].bias),
        Wm=read(layer.mma_lavin_router[name].weight),
        bm=read(layer.mma_lavin_router[name].bias),
    )


def route(t: torch.Tensor, p: dict, tau: float) -> torch.Tensor:
    """w = softmax((W_m t + b_m) / τ)."""
    return torch.softmax((t @ p["Wm"].T + p["bm"]) / tau, dim=-1)


def mma(x: torch.Tensor, p: dict, w: torch.Tensor, s: float) -> torch.Tensor:
    """out = (B z + b)·s·w0 + (D z + d)·s·w1 + x,  z = A x + a  (dropout off); w broadcasts against x[..., :1]."""
    z = x @ p["A"].T + p["a"]
    return (z @ p["B"].T + p["b"]) * s * w[..., :1] + (z @ p["D"].T + p["d"]) * s * w[..., 1:] + x


def official_logits(
    base,
    adapters: list[dict | None],
    modality_embedding,
    embeds,
    modality,
    s=1.0,
    tau=10.0,
    text_positions=None,
    record: list | None = None,
):
    """Logits of `base` (a plain LlamaForCausalLM) over `embeds` (B, S, C) with the official LaVIN layout.

    `adapters[i]` holds the tensors of layer i's attention-input adapter (None: no adapter). Returns (B, S, V):
    the logits at the text positions, the modality token's own row dropped. The text sits at RoPE positions 1..S
    after the token at 0, as officially, or at `text_positions` (S,) (RoPE is relative, so only rounding differs).
    `record`, if given, receives each adapter's routing weights (B, 2) in layer order.
    """
    batch, length, _ = embeds.shape
    tokens = modality_embedding[modality][:, None]  # (B, 1, C)
    x = torch.cat([tokens, embeds], dim=1)  # (B, 1 + S, C)
    mask = torch.full((1 + length, 1 + length), float("-inf")).triu(1)
    mask[1:, 0] = float("-inf")  # nobody but itself attends to the modality token
    mask = mask.expand(batch, 1, -1, -1).clone()  # (B, 1, 1 + S, 1 + S)

    def hook(p):
        def pre(module, args, kwargs):
            h = kwargs["hidden_states"]
            w = route(h[:, 0], p, tau)[:, None]  # (B, 1, 2) from position 0 of the adapter's own input
            if record is not None:
                record.append(w[:, 0])
            kwargs["hidden_states"] = mma(h, p, w, s)
            return args, kwargs

        return pre

    handles = [
        layer.self_attn.register_forward_pre_hook(hook(p), with_kwargs=True)
        for layer, p in zip(base.model.layers, adapters)
        if p is not None
    ]
    try:
        text = torch.arange(1, 1 + length) if text_positions is None else text_positions
        positions = torch.cat([torch.zeros(1, dtype=torch.long), text])[None].expand(batch, -1)
        logits = base(inputs_embeds=x, attention_mask=mask, position_ids=positions).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits[:, 1:]


def vision_tokens(encoder, adapters: list[dict], pixel_values, every: int, proj: dict, s=1.0, tau=10.0):
    """A timm ViT with a per-token-routed MM-adapter on each block's attention input, then the projector.

    `encoder` is the timm model whose blocks' `attn` may be wrapped (its `base_layer` is then used).
    """
    h = encoder.norm_pre(encoder._pos_embed(encoder.patch_embed(pixel_values)))
    cls = []
    for i, block in enumerate(encoder.blocks):
        attn = getattr(block.attn, "base_layer", block.attn)
        n = block.norm1(h)
        n = mma(n, adapters[i], route(n, adapters[i], tau), s)  # per token, from the image's own tokens
        h = h + block.ls1(attn(n))
        h = h + block.ls2(block.mlp(block.norm2(h)))
        if (i + 1) % every == 0:
            cls.append(h[:, 0])
    features = torch.stack(cls, dim=1)  # (B, n, C_v), no final norm
    hidden = torch.nn.functional.silu(features @ proj["W1"].T + proj["b1"])
    return hidden @ proj["W2"].T + proj["b2"]
