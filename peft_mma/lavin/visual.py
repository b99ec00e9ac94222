"""LaVIN's visual path (`lavin_mma.md` §4): a frozen encoder with MM-adapters in its blocks, then the projector.

    f = [CLS after blocks k, 2k, …, depth] of Enc_MMA(x)     x: (B, 3, H, W)  →  f: (B, n, C_v), no final norm
    V = W₂ · SiLU(W₁ f + b₁) + b₂                                                V: (B, n, C) visual tokens

Enc_MMA is the frozen `VisionBackbone` with an `MMAdapter` (per-token routing) on the input of every block's
attention, `x + Attn(MMA(Norm(x)))` as in the decoder. W₁: C_v → `projector_hidden` (128), W₂: 128 → C, xavier
weights (W₂'s times `projector_init_scale`, 1 officially) and zero biases; trainable, as are the encoder's
adapters. CLIP ViT-L/14 with k = 4 gives n = 6. Each image's tokens depend on that image alone: the official encoder
routes every image from batch element 0 (§4), ours does not (DESIGN decision 4).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from ..vision.backbone import VisionBackbone
from .config import LaVINConfig
from .layer import MMAdapter


def build_encoder(config: LaVINConfig, on_meta: bool) -> VisionBackbone:
    """The frozen encoder named by `config.vision_model` (a skeleton on a meta-device base: no weights are read);
    raises before anything is attached if `k` does not divide its depth."""
    with torch.device("meta") if on_meta else nullcontext():
        pretrained = config.vision_pretrained and not on_meta
        visual = VisionBackbone(config.vision_model, pretrained, config.vision_model_kwargs)
    if not visual.is_vit:
        raise ValueError(
            f"LaVIN reads the class token after every k-th block of a vision transformer; `vision_model`="
            f"{config.vision_model!r} has none (a convolutional network, or a ViT without one such as SigLIP). Use "
            "a ViT with a class token (e.g. 'vit_large_patch14_clip_quickgelu_224.openai'); LLaMA-Adapter V2 can "
            "read the others' tokens."
        )
    every = config.vision_feature_every
    if visual.depth % every:
        raise ValueError(
            f"`vision_feature_every`={every} must divide the depth {visual.depth} of `vision_model`="
            f"{config.vision_model!r} (ViT-L/14: 24 blocks, every 4 → 6 visual tokens)."
        )
    return visual


def add_encoder_adapters(visual: VisionBackbone, adapter_name: str, config: LaVINConfig, training: bool) -> None:
    """Wrap every block's attention of `visual` in an `MMAdapter` that routes each token from itself.

    The adapters follow `training` (dropout on while training); the encoder's own modules stay in eval mode.
    """
    for block in visual.blocks:
        attn_name = "attn" if hasattr(block, "attn") else "self_attn"
        attn = getattr(block, attn_name)
        setattr(block, attn_name, MMAdapter(attn, adapter_name, config, visual.width, routing="token"))
    visual.train(training)


def build_projector(
    in_width: int, hidden: int, out_width: int, device: torch.device, out_scale: float = 1.0
) -> tuple[nn.Linear, nn.Linear]:
    """(W₁, W₂) in fp32 on `device`: xavier-uniform weights (W₂'s with gain `out_scale`, `projector_init_scale`)
    and zero biases, left as they are on the meta device."""
    proj_in = nn.Linear(in_width, hidden, device=device, dtype=torch.float32)
    proj_out = nn.Linear(hidden, out_width, device=device, dtype=torch.float32)
    if device.type != "meta":
        for linear, gain in ((proj_in, 1.0), (proj_out, out_scale)):
            nn.init.xavier_uniform_(linear.weight, gain=gain), nn.init.zeros_(linear.bias)
    return proj_in, proj_out


def visual_tokens(
    visual: VisionBackbone, proj_in: nn.Linear, proj_out: nn.Linear, pixel_values: torch.Tensor, every: int
) -> torch.Tensor:
    """V = W₂ · SiLU(W₁ f + b₁) + b₂ for images `pixel_values` (B, 3, H, W): (B, n, C)."""
    features = visual.prefix_intermediates(pixel_values, every)  # (B, n, C_v)
    return proj_out(nn.functional.silu(proj_in(features.to(proj_in.weight.dtype))))  # (B, n, C)
