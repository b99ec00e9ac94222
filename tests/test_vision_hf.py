"""The transformers vision towers (`vision_model="hf:<local path>"`): CLIP with and without its projection head, a
full CLIP checkpoint, and SigLIP, each built tiny and saved to disk in the test (no network)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from peft_mma import LaVINConfig, LlamaAdapterV2Config
from peft_mma.data import ImageTokens
from peft_mma.vision.backbone import VisionBackbone

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32)
TOWERS = {
    "clip-projection": lambda: CLIPVisionModelWithProjection(
        CLIPVisionConfig(**VISION, patch_size=8, projection_dim=24)
    ),
    "clip-plain": lambda: CLIPVisionModel(CLIPVisionConfig(**VISION, patch_size=8)),
    "clip-full": lambda: CLIPModel(
        CLIPConfig(
            vision_config=dict(**VISION, patch_size=8),
            text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
            projection_dim=24,
        )
    ),
    "siglip": lambda: SiglipVisionModel(SiglipVisionConfig(**VISION, patch_size=8)),
}


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, tuple[str, torch.nn.Module]]:
    """name → (saved path, the model as saved), random weights from a fixed seed."""
    saved = {}
    for name, build in TOWERS.items():
        torch.manual_seed(0)
        model = build().eval()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        saved[name] = (str(path), model)
    return saved


def expected_features(name: str, model, pixels: torch.Tensor, every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Written directly against transformers: (all tokens after the final norm and projection, CLS after every
    `every`-th block)."""
    tower = getattr(model, "vision_model", model)  # transformers 5: CLIPVisionModel is the tower itself
    out = tower(pixel_values=pixels, output_hidden_states=True)
    # CLIP's last_hidden_state is before its final norm, SigLIP's after it
    tokens = out.last_hidden_state if name == "siglip" else tower.post_layernorm(out.last_hidden_state)
    if name in ("clip-projection", "clip-full"):
        tokens = model.visual_projection(tokens)
    cls = torch.stack([out.hidden_states[i][:, 0] for i in range(every, VISION["num_hidden_layers"] + 1, every)], 1)
    return tokens, cls


@pytest.mark.parametrize("name", list(TOWERS))
def test_backbone_reads_transformers_towers(towers, name):
    path, model = towers[name]
    backbone = VisionBackbone("hf:" + path)
    pixels = torch.randn(2, 3, 32, 32)
    tokens, cls = expected_features(name, model, pixels, every=2)
    with torch.no_grad():
        assert torch.equal(backbone.tokens(pixels), tokens)
        assert torch.equal(backbone.prefix_intermediates(pixels, every=2), cls)
    width = 24 if name in ("clip-projection", "clip-full") else 32
    assert (backbone.image_size, backbone.width, backbone.depth, backbone.token_width) == (32, 32, 4, width)
    assert not any(p.requires_grad for p in backbone.parameters())
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\)"):
        backbone.check_pixel_values(torch.randn(2, 3, 28, 28))


def test_lavin_refuses_a_tower_without_a_class_token(towers):
    path, _ = towers["siglip"]
    assert VisionBackbone("hf:" + path).is_vit is False and VisionBackbone("hf:" + towers["clip-plain"][0]).is_vit
    with pytest.raises(ValueError, match="LaVIN reads the class token .* has none .* such as SigLIP"):
        get_peft_model(tiny_llama(), LaVINConfig(vision_model="hf:" + path, vision_feature_every=2))


def test_unsupported_transformers_model_is_named(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type='llama'.*clip_vision_model"):
        VisionBackbone("hf:" + str(tmp_path))


def saved_keys(path) -> set[str]:
    return set(load_file(f"{path}/adapter_model.safetensors"))


def test_adapter_v2_on_a_clip_tower(towers, tmp_path):
    path, _ = towers["clip-projection"]
    config = LlamaAdapterV2Config(
        vision_model="hf:" + path, visual_width=16, visual_depth=1, visual_heads=2, prompt_length=3
    )
    base = tiny_llama()
    ids, pixels = torch.randint(3, 97, (2, 6)), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, expected)  # zero gates: identity

    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if p.requires_grad and "gate" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.train()
    model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
    bridge = [p for n, p in model.named_parameters() if "mma_adapter_v2_visual" in n]
    assert bridge and all(p.grad is not None and p.grad.abs().sum() > 0 for p in bridge)
    assert all(p.grad is None for n, p in model.named_parameters() if "mma_vision_backbone" in n)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids, pixel_values=pixels).logits
    model.save_pretrained(tmp_path)
    keys = saved_keys(tmp_path)
    assert keys and all(k.startswith("base_model.") and "mma_adapter_v2_" in k for k in keys)
    assert not any("vision_model" in k or "backbone" in k for k in keys)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True).eval()  # see test_reload_*
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, pixel_values=pixels).logits, trained)


def test_lavin_on_a_clip_tower(towers, tmp_path):
    """MM-adapters go into the CLIP encoder layers' attention; at init they are the identity, trained they act per
    image (a batchmate changes nothing), and only adapter weights are saved."""
    path, clip = towers["clip-plain"]
    config = dict(vision_model="hf:" + path, vision_feature_every=2, adapter_dropout=0.0)
    pixels = torch.randn(2, 3, 32, 32)
    _, cls = expected_features("clip-plain", clip, pixels, every=2)
    model = get_peft_model(tiny_llama(), LaVINConfig(**config)).eval()
    backbone = model.base_model.mma_lavin_visual["default"]
    with torch.no_grad():
        torch.testing.assert_close(backbone.prefix_intermediates(pixels, every=2), cls, atol=0, rtol=0)

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LaVINConfig(**config, init_weights=False)).eval()
    backbone = model.base_model.mma_lavin_visual["default"]
    adapted = [m for m in backbone.modules() if type(m).__name__ == "MMAdapter"]
    assert len(adapted) == VISION["num_hidden_layers"]
    with torch.no_grad():
        both = backbone.prefix_intermediates(pixels, every=2)
        alone = backbone.prefix_intermediates(pixels[:1], every=2)
        assert (both - cls).abs().max() > 1e-3  # the adapters act
        torch.testing.assert_close(both[:1], alone, atol=1e-6, rtol=0)
        ids = torch.randint(3, 97, (2, 6))
        ids[:, 0] = 1
        ids = ImageTokens.from_config(model.peft_config["default"]).expand(ids, bos_token_id=1)["input_ids"]
        trained = model(input_ids=ids, pixel_values=pixels).logits
        assert ids.shape == (2, 8) and (trained - model(input_ids=ids, pixel_values=-pixels).logits).abs().max() > 0
    model.save_pretrained(tmp_path)
    keys = saved_keys(tmp_path)
    assert any(".encoder.layers.0.self_attn.mma_lavin_down" in k for k in keys)
    frozen = {k for k in keys if "mma_lavin_visual" in k and not any(r in k for r in ("down", "up0", "up1", "router"))}
    assert not frozen, sorted(frozen)[:3]
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True).eval()  # see test_reload_*
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, pixel_values=pixels).logits, trained)


def test_official_lavin_checkpoint_converts_onto_a_clip_tower(towers, tmp_path):
    """The converter builds its skeleton on the meta device; a transformers tower is then built from its config."""
    from official_checkpoints import lavin

    from peft_mma.convert import convert_lavin

    path, _ = towers["clip-plain"]
    base = tiny_llama()
    overrides = dict(vision_model="hf:" + path, vision_feature_every=2)
    summary = convert_lavin(lavin(base, vision_width=32, vision_depth=4), base, tmp_path, overrides=overrides)
    assert summary.tensors_read == summary.tensors_written
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ids = ImageTokens.from_config(model.peft_config["default"]).expand(torch.tensor([[1, 5, 6, 7]]), bos_token_id=1)
    with torch.no_grad():
        out = model(input_ids=ids["input_ids"], pixel_values=torch.randn(1, 3, 32, 32)).logits
    assert out.shape == (1, 6, 97) and torch.isfinite(out).all()
