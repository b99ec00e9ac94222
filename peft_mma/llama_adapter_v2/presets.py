"""Named configurations that reproduce the released LLaMA-Adapter V2 checkpoint families (spec §2, §5, §8).

Each preset is a dict of `LlamaAdapterV2Config` fields; its parameter count on the 7B / 65B shapes is the test
(spec §5): BIAS-7B 63,095,552; chat-65B bias-scale-norm 13,811,712.
"""

from __future__ import annotations

from ..vision.backbone import CLIP_VIT_L14

_MULTIMODAL_7B = dict(
    bias_modules=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],  # no k/v bias (§2d)
    scale_modules=[],
    norm_modules=["input_layernorm", "post_attention_layernorm", "norm"],
    prompt_length=10,
    prompt_layers=None,  # every layer but the first: 31 of 32
    gate_activation="tanh",
    gate_layers="all",  # the checkpoint stores layer 0's unused gate
    prompt_kv_adapted=False,
    vision_model=CLIP_VIT_L14,
    visual_width=768,
    visual_depth=8,
    visual_heads=16,
    visual_fusion="all",  # the code adds V to every prompted layer (§3.6)
    zero_image_for_text=True,  # text-only samples were trained with a zero image (§3.7)
)

PRESETS: dict[str, dict] = {
    "BIAS-7B": dict(_MULTIMODAL_7B),
    "LORA-BIAS-7B": dict(
        _MULTIMODAL_7B,
        lora_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        r=16,
        lora_alpha=None,  # y += l2(l1(x)), no alpha scaling (§2g)
        prompt_gate_scale=True,  # `new_gate` (§2b)
    ),
    "CAPTION-7B": dict(  # the captioning model of the pre-training phase: gates, prompts, visual path only (§4)
        _MULTIMODAL_7B,
        bias_modules=[],
        norm_modules=[],
    ),
    "CHAT-65B": dict(  # Llama65B_bias_scale_norm_tuning (§2e)
        bias_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        scale_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        scale_side="input",
        norm_modules=["input_layernorm", "post_attention_layernorm", "norm"],
        prompt_layers=0,
        vision_model=None,
    ),
}
