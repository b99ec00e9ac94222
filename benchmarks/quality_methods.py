"""The methods the quality benchmark trains, behind one interface: `logits(batch, keep)` and `text_logits`.

Multimodal (visual QA), all reading the same frozen encoder (`Encoder`: the pretrained scene encoder by default,
or a randomly initialised ViT):
  * ``lavin``: LaVIN (MM-adapters in the LLM and the encoder, projector of the encoder's intermediate CLS tokens);
  * ``v2``: LLaMA-Adapter V2 (bias/scale/norms, gated prompts, a small visual bridge fused into the prompts);
  * ``lora_projector``: PEFT LoRA r8 on q,v plus a trainable Linear from the encoder's final CLS token to
    `SOFT_TOKENS` soft tokens placed in front of the text;
  * ``blind``: PEFT LoRA r8 on q,v trained on the same questions without their images: what the questions and
    options alone give away.
Text-only (procedural instructions): ``v2_bias_scale`` (no prompts), ``v2`` and ``lora_qv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_mma import LaVINConfig, LlamaAdapterV2Config
from peft_mma.data import ImageTokens
from peft_mma.vision.backbone import VisionBackbone

from .common import share_weights_copy

SOFT_TOKENS = 4
VQA_METHODS = ("lavin", "v2", "lora_projector", "blind")
TEXT_METHODS = ("v2_bias_scale", "v2", "lora_qv")
ENCODERS = ("scenes", "scenes_patches", "random")


@dataclass(frozen=True)
class Encoder:
    """The frozen encoder every multimodal method reads, and how LaVIN samples its class tokens."""

    name: str
    vision_model: str
    pretrained: bool
    image_size: int
    lavin_every: int  # LaVIN reads the class token after every `lavin_every`-th block
    kwargs: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """The config fields of a peft_mma method that name this encoder."""
        return dict(vision_model=self.vision_model, vision_pretrained=self.pretrained, vision_model_kwargs=self.kwargs)


def encoder(name: str = "scenes", seed: int = 0) -> Encoder:
    """``"scenes"``: the scene encoder pretrained on captions (`peft_mma.vision.scene_encoder`, built on first use);
    ``"scenes_patches"``: the same with slot heads on the mean of its patch tokens too (`patch_heads=True`);
    ``"random"``: the same architecture, randomly initialised. All read 64 px images; LaVIN reads the class token
    after each of their 4 blocks.

    The random one uses `weight_init="jax"` (xavier linears, the original ViT's scheme) instead of timm's default
    (std 0.02): with std 0.02 the intermediate CLS tokens LaVIN reads have little image-dependent spread, and LaVIN
    stayed at chance on an earlier task; with xavier their norms are closer to a trained encoder's.
    """
    from peft_mma.vision.scene_encoder import ARCH, IMAGE_SIZE, MODEL_ARGS, scene_encoder

    if name in ("scenes", "scenes_patches"):
        folder = scene_encoder(seed=seed, progress=True, patch_heads=name == "scenes_patches")
        return Encoder(name, folder, True, IMAGE_SIZE, 1)
    if name == "random":
        return Encoder(name, ARCH, False, IMAGE_SIZE, 1, {**MODEL_ARGS, "weight_init": "jax"})
    raise ValueError(f"Unknown encoder {name!r}; choose from {ENCODERS}.")


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

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's inputs for `batch`: its ids and mask, a multimodal method's images (LaVIN's also as
        placeholder ids after BOS), and positions counted from each row's first token, as `generate` counts them.
        Left padding would otherwise shift a row's positions by its padding: harmless to RoPE's relative scores,
        but V2's adaption prompts have no position, so their scores would change with the padding."""
        kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "pixel_values" in batch and self.multimodal:
            kwargs |= {"pixel_values": batch["pixel_values"], "has_image": batch["has_image"]}
            config = self.model.peft_config["default"]
            if isinstance(config, LaVINConfig):  # LaVIN's images sit in the ids, as placeholders after BOS
                tokens, bos = ImageTokens.from_config(config), self.model.config.bos_token_id
                kwargs |= tokens.expand(
                    kwargs["input_ids"], kwargs["attention_mask"], None, kwargs["has_image"], bos, padding_side="left"
                )
        return kwargs | {"position_ids": _positions(kwargs["attention_mask"])}

    def logits(self, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
        """The last `keep` positions' logits. They are asked for by index (`logits_to_keep` as a 1-D tensor), which
        hands the LM head a contiguous copy of those positions: the slice an int asks for is a strided view that
        `matmul` cannot flatten, and on the CPU it then multiplies by a per-sample broadcast of the head's weight,
        2.2 × the time of one matrix product (SmolLM2, 8 × 15 positions, one thread). Same values either way."""
        keep_at = torch.arange(-keep, 0, device=batch["input_ids"].device)
        return self.model(**self.inputs(batch), logits_to_keep=keep_at, use_cache=False).logits

    @torch.no_grad()
    def greedy(self, batch: dict[str, torch.Tensor], max_new_tokens: int, eos_id: int, pad_id: int) -> torch.Tensor:
        """Greedy continuations of `batch`'s left-padded prompts: (B, ≤ max_new_tokens) new ids, `pad_id` after a
        row's EOS, stopping once every row has given EOS (transformers' `generate`, with its KV cache)."""
        inputs = self.inputs(batch)
        inputs.pop("position_ids")  # `generate` counts them from the mask
        out = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id
        )
        return out[:, inputs["input_ids"].shape[1] :] if "input_ids" in inputs else out  # given embeddings: new ids

    def text_logits(self, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
        """The method used on text alone (no image inputs)."""
        text = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        return self.logits(text, keep)


class LoRAProjector(Method):
    """LoRA r8 q,v + Linear(CLS of the frozen encoder → `SOFT_TOKENS` × C) soft tokens before the text; a
    text-only sample's soft tokens are masked out."""

    def __init__(self, model: nn.Module, vision: Encoder) -> None:
        super().__init__("lora_projector", model)
        with torch.random.fork_rng(devices=[]):
            self.backbone = VisionBackbone(vision.vision_model, vision.pretrained, vision.kwargs)
        width = model.config.hidden_size
        self.proj = nn.Linear(self.backbone.width, SOFT_TOKENS * width)
        nn.init.normal_(self.proj.weight, std=0.02), nn.init.zeros_(self.proj.bias)

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's inputs for `batch`: the embeddings with the soft tokens in front of the text, their mask and
        positions; without images, the text's alone."""
        if "pixel_values" not in batch:
            return super().inputs(batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        embeds = self.model.get_input_embeddings()(ids)  # (B, S, C)
        with torch.no_grad():
            cls = self.backbone.encoder.forward_features(batch["pixel_values"])[:, 0]  # (B, C_v), final norm
        soft = self.proj(cls).view(len(ids), SOFT_TOKENS, -1) * batch["has_image"].view(-1, 1, 1)  # (B, k, C)
        embeds = torch.cat([soft.to(embeds.dtype), embeds], dim=1)  # (B, k + S, C)
        # order each row as [padding, BOS, soft tokens, text], LaVIN's layout for its visual tokens; a text-only row's
        # masked soft tokens join its padding, so no masked token sits inside the text
        rank = torch.where(mask.bool(), 3, 0)  # (B, S)
        rows, first = torch.arange(len(ids)), mask.argmax(1)
        is_bos = ids[rows, first] == self.model.config.bos_token_id
        rank[rows[is_bos], first[is_bos]] = 1
        soft_rank = torch.where(batch["has_image"].view(-1, 1), 2, 0).expand(-1, SOFT_TOKENS)  # text-only: padding
        rank = torch.cat([soft_rank.to(rank.dtype), rank], dim=1)  # (B, k + S)
        order = torch.argsort(rank, dim=1, stable=True)
        embeds = embeds.gather(1, order[..., None].expand_as(embeds))
        soft_mask = batch["has_image"].to(mask.dtype).view(-1, 1).expand(-1, SOFT_TOKENS)  # text-only: no tokens
        mask = torch.cat([soft_mask, mask], dim=1).gather(1, order)
        return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": _positions(mask)}


def build_method(
    name: str, base: nn.Module, multimodal: bool, seed: int = 0, vision: Encoder | None = None, **overrides: Any
) -> Method:
    """Method `name` (see the module docstring) on a weight-sharing copy of `base`, adapters seeded by `seed`;
    `multimodal` gives V2 its visual path, reading `vision` (default: `encoder("scenes")`); `overrides` go into the
    config of a peft_mma method."""
    if multimodal and vision is None:
        vision = encoder("scenes")
    torch.manual_seed(seed)
    model = share_weights_copy(base)
    if name == "lavin":
        config = LaVINConfig(**{**vision.settings(), "vision_feature_every": vision.lavin_every, **overrides})
        return Method(name, get_peft_model(model, config), multimodal=True)
    if name == "v2" and multimodal:
        small_bridge = dict(visual_width=192, visual_depth=2, visual_heads=3)
        config = LlamaAdapterV2Config(**{**vision.settings(), **small_bridge, **overrides})
        return Method(name, get_peft_model(model, config), multimodal=True)
    if name == "lora_projector":
        return LoRAProjector(get_peft_model(model, _lora_qv()), vision)
    if name == "blind":
        return Method(name, get_peft_model(model, _lora_qv()))  # not multimodal: the images are never read
    configs = {
        "v2": LlamaAdapterV2Config(),
        "v2_bias_scale": LlamaAdapterV2Config(prompt_layers=0),
        "lora_qv": _lora_qv(),
    }
    if name not in configs:
        raise ValueError(f"Unknown method {name!r}; choose from {sorted({*VQA_METHODS, *TEXT_METHODS})}.")
    return Method(name, get_peft_model(model, configs[name]))
