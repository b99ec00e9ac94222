"""The methods the quality benchmark trains, behind one interface: `logits(batch, keep)` and `text_logits`.

Multimodal (visual QA), all reading the same frozen, randomly initialised timm ViT:
  * ``lavin``: LaVIN (MM-adapters in the LLM and the encoder, projector of the CLS tokens after every 2nd block);
  * ``v2``: LLaMA-Adapter V2 (bias/scale/norms, gated prompts, a small visual bridge fused into the prompts);
  * ``lora_projector``: PEFT LoRA r8 on q,v plus a trainable Linear from the encoder's final CLS token to
    `SOFT_TOKENS` soft tokens placed in front of the text.
Text-only (procedural instructions): ``v2_bias_scale`` (no prompts), ``v2`` and ``lora_qv``.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_mma import LaVINConfig, LlamaAdapterV2Config
from peft_mma.data import ImageTokens
from peft_mma.vision.backbone import VisionBackbone

from .common import share_weights_copy

# A ViT-Ti/16 layout (12 blocks, width 192) at 28 px with 7 px patches: 16 patches + CLS; random weights, frozen.
# `weight_init="jax"` (xavier linears, the original ViT's scheme) instead of timm's default (std 0.02): with std 0.02
# the intermediate CLS tokens LaVIN reads have norms of 2-5 with little image-dependent spread, and LaVIN stayed at
# chance for 240 steps; with xavier they are 14-40, as a trained encoder's are, and it learns. The final normalised
# CLS token that the LoRA + projector baseline reads is the same size under both (norm 13).
VISION_MODEL = "vit_tiny_patch16_224"
VISION_KWARGS = dict(img_size=28, patch_size=7, num_classes=0, weight_init="jax")
IMAGE_SIZE = 28
SOFT_TOKENS = 4
VQA_METHODS = ("lavin", "v2", "lora_projector")
TEXT_METHODS = ("v2_bias_scale", "v2", "lora_qv")


def _lora_qv() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class Method(nn.Module):
    """A trainable model on a weight-sharing copy of the base; `logits` returns the last `keep` positions."""

    def __init__(self, name: str, model: nn.Module, multimodal: bool = False) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.multimodal = multimodal  # a peft_mma method that takes `pixel_values` and `has_image`

    def logits(self, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "pixel_values" in batch and self.multimodal:
            kwargs |= {"pixel_values": batch["pixel_values"], "has_image": batch["has_image"]}
            config = self.model.peft_config["default"]
            if isinstance(config, LaVINConfig):  # LaVIN's images sit in the ids, as placeholders after BOS
                tokens, bos = ImageTokens.from_config(config), self.model.config.bos_token_id
                kwargs |= tokens.expand(kwargs["input_ids"], kwargs["attention_mask"], None, kwargs["has_image"], bos)
        return self.model(**kwargs, logits_to_keep=keep, use_cache=False).logits

    def text_logits(self, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
        """The method used on text alone (no image inputs)."""
        text = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        return Method.logits(self, text, keep)


class LoRAProjector(Method):
    """LoRA r8 q,v + Linear(CLS of the frozen encoder → `SOFT_TOKENS` × C) soft tokens before the text; a
    text-only sample's soft tokens are masked out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__("lora_projector", model)
        with torch.random.fork_rng(devices=[]):
            self.backbone = VisionBackbone(VISION_MODEL, False, VISION_KWARGS)
        width = model.config.hidden_size
        self.proj = nn.Linear(self.backbone.width, SOFT_TOKENS * width)
        nn.init.normal_(self.proj.weight, std=0.02), nn.init.zeros_(self.proj.bias)

    def logits(self, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        embeds = self.model.get_input_embeddings()(ids)  # (B, S, C)
        with torch.no_grad():
            cls = self.backbone.encoder.forward_features(batch["pixel_values"])[:, 0]  # (B, C_v), final norm
        soft = self.proj(cls).view(len(ids), SOFT_TOKENS, -1) * batch["has_image"].view(-1, 1, 1)  # (B, k, C)
        embeds = torch.cat([soft.to(embeds.dtype), embeds], dim=1)  # (B, k + S, C)
        # order each row as [padding, BOS, soft tokens, text], LaVIN's layout for its visual tokens
        rank = torch.where(mask.bool(), 3, 0)  # (B, S)
        rows, first = torch.arange(len(ids)), mask.argmax(1)
        is_bos = ids[rows, first] == self.model.config.bos_token_id
        rank[rows[is_bos], first[is_bos]] = 1
        rank = torch.cat([rank.new_full((len(ids), SOFT_TOKENS), 2), rank], dim=1)  # (B, k + S)
        order = torch.argsort(rank, dim=1, stable=True)
        embeds = embeds.gather(1, order[..., None].expand_as(embeds))
        soft_mask = batch["has_image"].to(mask.dtype).view(-1, 1).expand(-1, SOFT_TOKENS)  # text-only: no tokens
        mask = torch.cat([soft_mask, mask], dim=1).gather(1, order)
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=_positions(mask),
            logits_to_keep=keep,
            use_cache=False,
        )
        return out.logits


def build_method(name: str, base: nn.Module, multimodal: bool, seed: int = 0, **overrides: Any) -> Method:
    """Method `name` (see the module docstring) on a weight-sharing copy of `base`, adapters seeded by `seed`;
    `multimodal` gives V2 its visual path; `overrides` go into the config of a peft_mma method."""
    torch.manual_seed(seed)
    model = share_weights_copy(base)
    vision = dict(vision_model=VISION_MODEL, vision_pretrained=False, vision_model_kwargs=VISION_KWARGS)
    if name == "lavin":
        config = LaVINConfig(**{**vision, "vision_feature_every": 2, **overrides})  # 6 visual tokens, LaVIN's count
        return Method(name, get_peft_model(model, config), multimodal=True)
    if name == "v2" and multimodal:
        small_bridge = dict(visual_width=192, visual_depth=2, visual_heads=3)
        config = LlamaAdapterV2Config(**{**vision, **small_bridge, **overrides})
        return Method(name, get_peft_model(model, config), multimodal=True)
    if name == "lora_projector":
        return LoRAProjector(get_peft_model(model, _lora_qv()))
    configs = {
        "v2": LlamaAdapterV2Config(),
        "v2_bias_scale": LlamaAdapterV2Config(prompt_layers=0),
        "lora_qv": _lora_qv(),
    }
    if name not in configs:
        raise ValueError(f"Unknown method {name!r}; choose from {sorted({*VQA_METHODS, *TEXT_METHODS})}.")
    return Method(name, get_peft_model(model, configs[name]))
