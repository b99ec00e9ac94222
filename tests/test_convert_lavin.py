"""Official LaVIN checkpoints → PEFT adapters: logits equal the Meta-layout reference (spec `lavin_mma.md` §9)."""

from __future__ import annotations

import json

import pytest
import torch
from official_checkpoints import TINY_VIT, VISION_MODEL, lavin, norms_only_base, parity_base
from peft import PeftModel
from reference.meta_layout_ref import hf_to_meta, lavin_logits, lavin_visual_tokens
from safetensors.torch import load_file

from peft_mma.convert import convert_lavin
from peft_mma.data import ImageTokens
from peft_mma.vision.backbone import VisionBackbone

PLACEHOLDER = 96
# the official sequence is [E_m, BOS, "Image: ", visual tokens, text]: a placeholder token marks the image slot
OVERRIDES = dict(
    vision_pretrained=False,
    vision_model_kwargs=TINY_VIT,
    vision_feature_every=2,
    image_token_position="placeholder",
    image_token_id=PLACEHOLDER,
)


def prompt(image: bool) -> torch.Tensor:
    """[BOS, two "Image: " tokens, the image slot, text] (1, 10)."""
    ids = torch.randint(3, PLACEHOLDER, (1, 10), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = 1
    if image:
        ids[0, 3] = PLACEHOLDER
    return ids


@pytest.fixture
def converted(tmp_path):
    """(PEFT model from the folder converted from a saved official .pth, Meta-layout base, official state dict)."""
    base = parity_base("mha")
    meta = hf_to_meta(base)
    checkpoint = lavin(base)
    torch.save(checkpoint, tmp_path / "checkpoint-19.pth")
    summary = convert_lavin(tmp_path / "checkpoint-19.pth", base, tmp_path / "adapter", overrides=OVERRIDES)
    assert summary.preset == "lavin-7b"
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    return model, meta, checkpoint["model"]


def test_image_sample_gives_the_official_logits(converted):
    model, meta, official = converted
    ids, pixels = prompt(image=True), torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    expanded = ImageTokens.from_config(model.peft_config["default"]).expand(ids)["input_ids"]  # the slot → 2 tokens
    assert expanded.shape == (1, 11) and (expanded[0, 3:5] == PLACEHOLDER).all()
    with torch.no_grad():
        got = model(input_ids=expanded, pixel_values=pixels).logits  # (1, 10 − 1 + 2, V)
        with model.disable_adapter():
            plain = model(input_ids=ids.masked_fill(ids == PLACEHOLDER, 5)).logits
    encoder = VisionBackbone(VISION_MODEL, False, TINY_VIT).encoder  # the frozen encoder the adapter rebuilds
    visual = lavin_visual_tokens(official, encoder, pixels, every=2, tau=5.0)  # (1, 2, C), official routing
    embeds = meta["tok_embeddings.weight"][ids]
    embeds = torch.cat([embeds[:, :3], visual, embeds[:, 4:]], dim=1)  # BOS, "Image: ", P(CLIP), text
    expected = lavin_logits(meta, official, embeds, modality=1, tau=5.0, heads=4, kv_heads=4, eps=1e-6).float()
    assert (expected[:, :3] - plain[:, :3]).abs().max() > 1.0  # not vacuous
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_text_sample_gives_the_official_logits(converted):
    model, meta, official = converted
    ids = prompt(image=False)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    embeds = meta["tok_embeddings.weight"][ids]
    expected = lavin_logits(meta, official, embeds, modality=0, tau=5.0, heads=4, kv_heads=4, eps=1e-6).float()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_sizes_temperature_and_counts_come_from_the_checkpoint(tmp_path):
    base = parity_base("mha")
    checkpoint = lavin(base, adapter_dim=4, groups=4, projector=8)
    checkpoint["args"].adapter_scale = 0.5  # the presets' s is 1: a checkpoint's own must win
    summary = convert_lavin(checkpoint, base, tmp_path, overrides=OVERRIDES, progress=False)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["adapter_dim"], config["adapter_groups"], config["projector_hidden"]) == (4, 4, 8)
    assert (config["temperature"], config["adapter_placement"], config["vision_adapters"]) == (5.0, "attn", True)
    assert config["adapter_scale"] == 0.5
    saved = load_file(tmp_path / "adapter_model.safetensors")
    official = checkpoint["model"]
    assert summary.tensors_read == summary.tensors_written == len(saved) == len(official)
    assert summary.parameters == sum(t.numel() for t in saved.values()) == sum(t.numel() for t in official.values())
    up = saved["base_model.model.model.layers.0.self_attn.mma_lavin_up0.weight"]  # (g, C/g, h/g)
    conv = official["module.layers.0.adapter_attn.conv_B.weight"]  # (C, h/g, 1), groups g
    assert torch.equal(torch.block_diag(*up), torch.block_diag(*conv[..., 0].split(8)))


def test_lavin_7b_shapes_give_the_3_8m_parameters_of_the_paper(tmp_path):
    """Spec §5: 3,781,296 with CLIP ViT-L/14's 24 blocks of width 1024 (built on the meta device, never downloaded)."""
    base = norms_only_base(tmp_path / "llama-7b", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
    checkpoint = lavin(base, projector=128, vision_width=1024, vision_depth=24)
    summary = convert_lavin(checkpoint, str(tmp_path / "llama-7b"), tmp_path / "out", progress=False)
    assert (summary.preset, summary.parameters) == ("lavin-7b", 3_781_296)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["vision_model"] == VISION_MODEL and config["vision_pretrained"] is True
    assert config["base_model_name_or_path"] == str(tmp_path / "llama-7b")


@pytest.mark.parametrize("declared", [True, False])
def test_lavin_13b_shapes_give_the_5_4m_parameters_of_the_paper(tmp_path, declared):
    """Spec §5: 5,390,080 for 13B (ScienceQA and the chatbot share the layout, t = 5). The preset comes from
    `args.llm_model`, or from the width when a checkpoint carries no args."""
    base = norms_only_base(
        tmp_path / "llama-13b", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40
    )
    checkpoint = lavin(base, projector=128, vision_width=1024, vision_depth=24)
    if declared:
        checkpoint["args"].llm_model = "13B"
    else:
        del checkpoint["args"]
    summary = convert_lavin(checkpoint, str(tmp_path / "llama-13b"), tmp_path / "out", progress=False)
    assert (summary.preset, summary.parameters) == ("lavin-13b", 5_390_080)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["temperature"] == 5.0
