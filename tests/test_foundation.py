"""The package foundation: PEFT type registration and the shared vision backbone."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import CLIP_VIT_L14, TINY_VIT
from peft.utils import PeftType

import peft_mma
from peft_mma.registry import ensure_peft_type
from peft_mma.vision import VisionBackbone


def test_peft_types_behave_like_native_members():
    member = PeftType.MMA_ADAPTER_V2
    assert member is PeftType["MMA_ADAPTER_V2"] is PeftType("MMA_ADAPTER_V2")
    assert member in list(PeftType) and member == "MMA_ADAPTER_V2"
    assert json.dumps({"peft_type": member}) == '{"peft_type": "MMA_ADAPTER_V2"}'
    assert pickle.loads(pickle.dumps(member)) is member
    assert ensure_peft_type("MMA_ADAPTER_V2") is member  # idempotent
    assert peft_mma.MMA_LAVIN is PeftType.MMA_LAVIN


@pytest.fixture
def vit() -> VisionBackbone:
    torch.manual_seed(0)
    return VisionBackbone(CLIP_VIT_L14, model_kwargs=TINY_VIT)


def test_backbone_is_frozen_and_stays_in_eval(vit):
    assert not any(p.requires_grad for p in vit.parameters())
    vit.train()
    assert not vit.encoder.training


def test_backbone_tokens_are_final_norm_then_projection(vit):
    x = torch.randn(2, 3, 28, 28)
    enc = vit.encoder
    h = enc.norm_pre(enc._pos_embed(enc.patch_embed(x)))
    for block in enc.blocks:
        h = block(h)
    expected = enc.head(enc.norm(h))  # all 5 tokens: CLS + 2x2 patches
    torch.testing.assert_close(vit.tokens(x), expected, atol=1e-6, rtol=0)
    assert vit.tokens(x).shape == (2, 5, 768) and vit.token_width == 768 and vit.projects_tokens  # CLIP's projection


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("vit_base_patch16_224", dict(num_classes=1000)),  # tag augreg2_in21k_ft_in1k: an ImageNet classifier
        ("deit_base_patch16_224", {}),  # fb_in1k
        ("vit_base_patch16_siglip_224", {}),  # no class token
        ("vit_medium_patch16_gap_256", dict(num_classes=10)),  # no class token, average pooling, a classifier
    ],
)
def test_backbone_tokens_of_classifiers_and_class_token_free_vits_are_their_features(name, kwargs):
    """A timm transformer's classifier head would turn each token into class scores, and a transformer without a
    class token is no CNN: both give `forward_features` as it is, (B, N, C) at `token_width` C."""
    backbone = VisionBackbone(name, model_kwargs=dict(TINY_VIT, **kwargs))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        features = backbone.encoder.forward_features(x)
    assert not backbone.projects_tokens and backbone.token_width == 32
    assert torch.equal(backbone.tokens(x), features) and features.shape[-1] == 32


def test_backbone_prefix_intermediates_are_cls_after_every_kth_block(vit):
    x = torch.randn(3, 3, 28, 28)
    enc = vit.encoder
    h = enc.norm_pre(enc._pos_embed(enc.patch_embed(x)))
    cls = []
    for i, block in enumerate(enc.blocks):
        h = block(h)
        if (i + 1) % 2 == 0:
            cls.append(h[:, 0])
    torch.testing.assert_close(vit.prefix_intermediates(x, every=2), torch.stack(cls, 1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="must divide the vision depth 4"):
        vit.prefix_intermediates(x, every=3)


@pytest.mark.parametrize(
    "pixels, match",
    [
        (torch.randn(2, 3, 32, 32), r"shape \(batch, 3, 28, 28\)"),
        (torch.randn(3, 28, 28), r"shape \(batch, 3, 28, 28\)"),
        (torch.zeros(2, 3, 28, 28, dtype=torch.long), "floating-point"),
    ],
)
def test_backbone_rejects_bad_pixel_values(vit, pixels, match):
    with pytest.raises(ValueError, match=match):
        vit.check_pixel_values(pixels)


def test_unknown_vision_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a timm model name"):
        VisionBackbone("not_a_model_xyz")


@pytest.mark.parametrize("method", ["adapter-v2", "lavin"])
def test_set_requires_grad_reaches_model_level_modules_and_encoder_adapters(method):
    """PEFT's `set_requires_grad` walks only the LLM; ours also reaches the visual bridge / projector / modality
    embedding held on the tuner and the adapters inside the frozen encoder, and never unfreezes the encoder."""
    from conftest import config_for, tiny_llama
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(), config_for("lavin-image" if method == "lavin" else "v2-image"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model_level = {n for n in trainable if n.startswith("base_model.mma_")}
    assert model_level  # the check below is not vacuous

    model.base_model.set_requires_grad("default", requires_grad=False)
    assert not any(p.requires_grad for p in model.parameters())
    model.base_model.set_requires_grad("default", requires_grad=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # the encoder stays frozen
