"""Official LLaMA-Adapter V2 checkpoints → PEFT adapters: logits equal the Meta-layout reference (spec §9)."""

from __future__ import annotations

import json

import pytest
import torch
from official_checkpoints import FEATURES, TINY_VIT, VISION_MODEL, llama_adapter_v2, norms_only_base, parity_base
from peft import PeftModel
from reference.meta_layout_ref import adapter_v2_logits, adapter_v2_visual, hf_to_meta, openai_clip_tokens
from safetensors.torch import load_file

from peft_mma.convert import convert_llama_adapter_v2
from peft_mma.vision.backbone import VisionBackbone

VISION = dict(vision_pretrained=False, vision_model_kwargs=TINY_VIT, visual_heads=2)
# ε of the LayerNorms inside the visual blocks: the official blocks (timm 0.3.2 `Block`, default
# `norm_layer=nn.LayerNorm`) use 1e-5, and so does `AdapterV2VisualBridge` (timm 1.0's default would be 1e-6).
OFFICIAL_BLOCK_EPS = 1e-5


def ids(batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(0))


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 28, 28, generator=torch.Generator().manual_seed(1))


def clip_tokens(pixels: torch.Tensor) -> torch.Tensor:
    """The official CLIP's tokens, ln_post and projection applied (spec §3.1), computed by the independent reference
    with the weights of the encoder the adapter rebuilds from its config (fixed seed, no pretrained weights)."""
    encoder = VisionBackbone(VISION_MODEL, False, TINY_VIT).encoder
    return openai_clip_tokens(encoder, pixels).float()  # (B, N, C_f)


def convert(layout: str, kind: str, tmp_path, overrides: dict | None = None, **kwargs):
    """(PEFT model loaded from the converted folder, Meta-layout base weights, official state dict, summary)."""
    base = parity_base(kind)
    meta = hf_to_meta(base)
    checkpoint = llama_adapter_v2(layout, base, **kwargs)
    overrides = overrides if overrides is not None else VISION if layout != "chat" else {}
    summary = convert_llama_adapter_v2(checkpoint, base, tmp_path / "adapter", overrides=overrides, progress=False)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    return model, meta, checkpoint["model"], summary


def reference(model, meta, official, tokens, visual, **kwargs) -> torch.Tensor:
    config = model.base_model.model.config
    llama = dict(heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, eps=config.rms_norm_eps)
    return adapter_v2_logits(meta, official, tokens, visual, **llama, **kwargs).float()


@pytest.mark.parametrize("layout", ["bias", "lora"])
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_multimodal_checkpoint_gives_the_official_logits(tmp_path, layout, kind):
    model, meta, official, summary = convert(layout, kind, tmp_path)
    assert summary.preset == {"bias": "BIAS-7B", "lora": "LORA-BIAS-7B"}[layout]
    x, pixels = ids(), images()
    with torch.no_grad():
        got = model(input_ids=x, pixel_values=pixels).logits
        with model.disable_adapter():
            plain = model(input_ids=x).logits
    visual = adapter_v2_visual(official, clip_tokens(pixels), heads=2, block_eps=OFFICIAL_BLOCK_EPS)
    expected = reference(model, meta, official, x, visual)
    assert (expected - plain).abs().max() > 1.0  # the adapter changes the logits a lot: the check is not vacuous
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_text_only_input_adds_the_zero_image_tokens_as_the_official_training(tmp_path):
    model, meta, official, _ = convert("bias", "mha", tmp_path)
    x = ids()
    with torch.no_grad():
        got = model(input_ids=x).logits
    visual = adapter_v2_visual(official, clip_tokens(torch.zeros(1, 3, 28, 28)), 2, block_eps=OFFICIAL_BLOCK_EPS)
    torch.testing.assert_close(got, reference(model, meta, official, x, visual), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_chat_65b_input_side_scale_gives_the_official_logits(tmp_path, kind):
    model, meta, official, summary = convert("chat", kind, tmp_path)
    assert summary.preset == "CHAT-65B"
    config = model.peft_config["default"]
    assert config.scale_side == "input" and config.prompt_layers == 0 and config.vision_model is None
    x = ids()
    with torch.no_grad():
        got = model(input_ids=x).logits
    torch.testing.assert_close(got, reference(model, meta, official, x, None, prompt_kv="adapted"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("gates, length", [(True, 3), ("every layer", 3), ("every layer", 4)])
def test_chat_checkpoint_with_prompts_reads_prompt_k_v_through_scale_and_bias(tmp_path, gates, length):
    """The chat code keeps a gate in every layer (the unprompted ones' zero); a file may also hold only the
    prompted layers' gates. Either way L = 3 of the 4 layers and K from the rows, even where L·K rows would also
    split into 4 layers (K = 4: 12 rows)."""
    model, meta, official, _ = convert("chat", "mha", tmp_path, overrides={}, chat_prompts=gates, prompt_length=length)
    config = model.peft_config["default"]
    assert config.prompt_kv_adapted and (config.prompt_layers, config.prompt_length) == (3, length)
    assert config.gate_layers == ("all" if gates == "every layer" else "prompted")
    x = ids()
    with torch.no_grad():
        got = model(input_ids=x).logits
    expected = reference(model, meta, official, x, None, prompt_kv="adapted", prompt_length=length)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_folder_holds_every_official_parameter_once(tmp_path):
    base = parity_base("mha")
    checkpoint = llama_adapter_v2("lora", base)
    summary = convert_llama_adapter_v2(checkpoint, base, tmp_path, overrides=VISION, progress=False)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    official = checkpoint["model"]
    assert summary.tensors_read == len(official)
    assert summary.tensors_written == len(saved) == len(official) - 1 + 3  # adapter_query → 3 prompted layers
    assert summary.parameters == sum(t.numel() for t in saved.values()) == sum(t.numel() for t in official.values())
    assert summary.file_size == (tmp_path / "adapter_model.safetensors").stat().st_size
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MMA_ADAPTER_V2" and config["inference_mode"] is True
    assert (config["prompt_length"], config["prompt_layers"], config["r"]) == (3, 3, 2)
    assert (config["visual_width"], config["visual_depth"], config["base_num_layers"]) == (16, 2, 4)
    assert saved["base_model.mma_adapter_v2_visual.clip_proj.weight"].shape == (16, FEATURES)


def test_chat_65b_shapes_give_the_14m_parameters_of_the_paper(tmp_path):
    """Spec §5: the paper's "14M" is exactly the chat-65B bias + input-side scale + norm count."""
    base = norms_only_base(
        tmp_path / "llama-65b", hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64
    )
    checkpoint = llama_adapter_v2("chat", base)
    summary = convert_llama_adapter_v2(checkpoint, str(tmp_path / "llama-65b"), tmp_path / "out", progress=False)
    assert (summary.preset, summary.parameters, summary.tensors_written) == ("CHAT-65B", 13_811_712, 80 * 16 + 1)


@pytest.mark.parametrize("with_norms", [False, True])
def test_caption_checkpoint_gives_the_official_logits(tmp_path, with_norms):
    """CAPTION-7B (the pre-training phase: gates, prompts, visual path; `w_bias` False): no biases, and norms only
    where the file has them."""
    base = parity_base("gqa")
    meta = hf_to_meta(base)
    checkpoint = llama_adapter_v2("caption", base)
    if with_norms:
        tuned = llama_adapter_v2("bias", base)["model"]
        checkpoint["model"] |= {k: v for k, v in tuned.items() if k.endswith("norm.weight") and "proj" not in k}
    summary = convert_llama_adapter_v2(checkpoint, base, tmp_path / "adapter", overrides=VISION, progress=False)
    assert summary.preset == "CAPTION-7B"
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    config = model.peft_config["default"]
    assert config.bias_modules == [] and bool(config.norm_modules) == with_norms
    x, pixels = ids(), images()
    with torch.no_grad():
        got = model(input_ids=x, pixel_values=pixels).logits
    visual = adapter_v2_visual(checkpoint["model"], clip_tokens(pixels), heads=2, block_eps=OFFICIAL_BLOCK_EPS)
    torch.testing.assert_close(got, reference(model, meta, checkpoint["model"], x, visual), atol=1e-5, rtol=0)
