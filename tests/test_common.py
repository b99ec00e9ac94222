"""Behaviours both methods share, each checked on every row of a matrix, as PEFT's own `ALL_CONFIGS` tests do:
LLaMA-Adapter V2 and LaVIN, text-only and with a vision encoder. PEFT's conventions here: low-CPU-memory loading,
adapter dtype autocasting, both kinds of gradient checkpointing, and the idempotent-merge warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import CLIP_VIT_L14, LAVIN_VISION, TINY_VIT, lavin_batch, tiny_llama
from peft import PeftModel, get_peft_model

from peft_mma import LaVINConfig, LlamaAdapterV2Config

V2_VISION = dict(
    vision_model=CLIP_VIT_L14, vision_pretrained=False, vision_model_kwargs=TINY_VIT,
    visual_width=16, visual_depth=1, visual_heads=2,
)  # fmt: skip
MATRIX = {
    "v2-text": lambda: LlamaAdapterV2Config(init_weights=False),
    "v2-image": lambda: LlamaAdapterV2Config(init_weights=False, **V2_VISION),
    "lavin-text": lambda: LaVINConfig(init_weights=False, adapter_dropout=0.0),
    "lavin-image": lambda: LaVINConfig(init_weights=False, adapter_dropout=0.0, **LAVIN_VISION),
}


def build(row: str, base=None, **kwargs):
    torch.manual_seed(1)
    return get_peft_model(base if base is not None else tiny_llama("gqa", "sdpa"), MATRIX[row](), **kwargs)


def batch_for(row: str, model) -> dict[str, torch.Tensor]:
    """A batch with labels; with images for the vision rows (one image sample, one text-only)."""
    if row == "lavin-image":
        return lavin_batch(model, has_image=(True, False))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (2, 7), generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    if row == "v2-image":
        batch |= {
            "pixel_values": torch.randn(2, 3, 28, 28, generator=generator),
            "has_image": torch.tensor([True, False]),
        }
    return batch


@pytest.mark.parametrize("row", list(MATRIX))
def test_low_cpu_mem_usage_loading_gives_the_same_model(tmp_path, row):
    model = build(row).eval()
    batch = batch_for(row, model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama("gqa", "sdpa"), tmp_path, low_cpu_mem_usage=True).eval()
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("row", list(MATRIX))
def test_adapter_dtype_follows_autocast_adapter_dtype(row, autocast):
    """On a bf16 base, adapter weights are fp32 by default and bf16 with `autocast_adapter_dtype=False`, as PEFT's
    own methods; frozen weights (base and encoder) stay bf16; the model runs either way."""
    model = build(row, tiny_llama("gqa", "sdpa").to(torch.bfloat16), autocast_adapter_dtype=autocast)
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32 if autocast else torch.bfloat16} and frozen == {torch.bfloat16}
    batch = batch_for(row, model)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("row", list(MATRIX))
def test_gradient_checkpointing_reaches_every_trainable_parameter(row, reentrant):
    """Reentrant and non-reentrant checkpointing: every trainable parameter gets a gradient, equal to the one
    without checkpointing."""
    plain = build(row).train()
    batch = batch_for(row, plain)
    plain(**batch).loss.backward()
    expected = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    model = build(row).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on use_reentrant
        model(**batch).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("row", ["v2-text", "lavin-text", "lavin-image"])
def test_a_second_merge_warns_and_changes_nothing(row):
    config = LlamaAdapterV2Config(init_weights=False, prompt_layers=0) if row == "v2-text" else None
    model = build(row) if config is None else get_peft_model(tiny_llama("gqa", "sdpa"), config)
    model.eval().base_model.merge_adapter()
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.base_model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, merged, atol=0, rtol=0)


@pytest.mark.parametrize("row", ["v2-image", "lavin-image"])
@pytest.mark.parametrize(
    "flags, match",
    [
        ([True, False], "`has_image` must be a 1-D bool tensor"),
        (torch.tensor([1, 0]), "`has_image` must be a 1-D bool tensor"),
        (torch.tensor([True]), "`has_image` has 1 flags for a batch of 2"),
    ],
)
def test_bad_has_image_is_refused(row, flags, match):
    model = build(row).eval()
    batch = batch_for(row, model)
    with pytest.raises(ValueError, match=match):
        model(**{**batch, "has_image": flags})


def test_a_convolutional_encoder_gives_v2_its_feature_map_and_lavin_a_clear_error():
    v2 = get_peft_model(tiny_llama(), LlamaAdapterV2Config(vision_model="resnet18", vision_pretrained=False, **{
        k: v for k, v in V2_VISION.items() if k.startswith("visual_")}, init_weights=False)).eval()  # fmt: skip
    backbone = v2.base_model.mma_vision_backbone["default"]
    assert not backbone.is_vit and backbone.token_width == 512 and backbone.image_size == 224
    images = torch.randn(2, 3, 64, 64)
    assert backbone.tokens(images).shape == (2, 4, 512)  # a 2 × 2 feature map of 512 channels
    ids = torch.randint(3, 97, (2, 5))
    with torch.no_grad():
        with_images = v2(input_ids=ids, pixel_values=torch.randn(2, 3, 224, 224)).logits
        assert (with_images - v2(input_ids=ids).logits).abs().max() > 1e-4  # the feature map reaches the prompts
    base = tiny_llama()
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="LaVIN reads the class token after every k-th block of a vision transformer"):
        get_peft_model(base, LaVINConfig(vision_model="resnet18", vision_pretrained=False))
    assert [n for n, _ in base.named_modules()] == names


@pytest.mark.parametrize("config", [LaVINConfig, LlamaAdapterV2Config])
def test_pretrained_weights_come_from_the_local_cache_or_fail_at_once_offline(config, tmp_path, monkeypatch):
    """No network here: weights missing from the cache raise at once (no retries), and cached ones load."""
    import time

    import huggingface_hub
    import timm
    from safetensors.torch import save_file

    from peft_mma.vision import backbone as backbone_module

    name, kwargs = "vit_tiny_patch16_224", dict(img_size=28, patch_size=14, depth=4)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, filename, **kw: None)
    monkeypatch.setattr(backbone_module, "_hub_reachable", lambda timeout=3.0: False)
    base = tiny_llama()
    started = time.perf_counter()
    with pytest.raises(ValueError, match="not in the local Hugging Face cache, and the Hub cannot be reached"):
        get_peft_model(base, config(vision_model=name, vision_model_kwargs=kwargs))
    assert time.perf_counter() - started < 5
    torch.manual_seed(7)
    weights = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    save_file(weights, tmp_path / "model.safetensors")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, filename, **kw: str(tmp_path / (
        "model.safetensors")) if filename == "model.safetensors" else None)  # fmt: skip
    model = get_peft_model(tiny_llama(), config(vision_model=name, vision_model_kwargs=kwargs))
    encoder = next(m for m in model.modules() if type(m).__name__ == "VisionBackbone").encoder
    loaded = {k.replace(".base_layer", ""): v for k, v in encoder.state_dict().items() if "mma_" not in k}
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
