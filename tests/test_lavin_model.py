"""LaVINModel through PEFT: identity, images, save/load, merge, generate, several adapters, parameter counts."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from reference.lavin_ref import adapter_tensors, official_logits
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from peft_mma import LaVINConfig

TINY_VIT = dict(img_size=28, patch_size=14, depth=4, embed_dim=32, num_heads=4)
VISION = dict(
    vision_model="vit_large_patch14_clip_224.openai",
    vision_pretrained=False,
    vision_model_kwargs=TINY_VIT,
    vision_feature_every=2,
)


def lavin(kind="mha", attn="eager", seed=1, **kwargs):
    torch.manual_seed(seed)
    config = LaVINConfig(**{"init_weights": False, "adapter_dropout": 0.0, **VISION, **kwargs})
    model = get_peft_model(tiny_llama(kind, attn), config)
    with torch.no_grad():
        model.base_model.mma_lavin_modality["default"].normal_(0, 3)
    return model.eval()


def ids_with_bos(batch=2, length=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (batch, length), generator=generator)
    ids[:, 0] = 1
    return ids


def test_identity_at_init_for_text(llama):
    reference = LlamaForCausalLM(llama.config).eval()
    reference.load_state_dict(llama.state_dict())
    model = get_peft_model(llama, LaVINConfig(**VISION)).eval()
    ids = ids_with_bos()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=0, rtol=0)


def test_images_match_official_layout_end_to_end():
    model = lavin()
    reference = tiny_llama()
    tuner = model.base_model
    ids, pixels = ids_with_bos(), torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=pixels).logits  # (2, 7 + 2, V)
        visual = tuner.encode_images(pixels)  # (2, 2, C)
        embeds = reference.model.embed_tokens(ids)
        embeds = torch.cat([embeds[:, :1], visual, embeds[:, 1:]], dim=1)  # BOS, visual tokens, text
        adapters = [adapter_tensors(layer.self_attn) for layer in tuner.model.model.layers]
        expected = official_logits(
            reference, adapters, tuner.mma_lavin_modality["default"], embeds, torch.tensor([1, 1])
        )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mixed_batch_rows_equal_single_runs_and_labels_skip_visual_tokens():
    model = lavin()
    ids, pixels = ids_with_bos(), torch.randn(2, 3, 28, 28)
    labels = ids.clone()
    with torch.no_grad():
        mixed = model(input_ids=ids, pixel_values=pixels, image_mask=torch.tensor([True, False]), labels=labels)
        image_only = model(input_ids=ids[:1], pixel_values=pixels[:1]).logits
        text_only = model(input_ids=ids[1:]).logits
    torch.testing.assert_close(mixed.logits[:1], image_only, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.logits[1:, :7], text_only, atol=1e-5, rtol=0)  # right-padded by 2
    assert torch.isfinite(mixed.loss)


def test_placeholder_position_replaces_the_token():
    model = lavin(image_token_position="placeholder", image_token_id=96)
    ids = ids_with_bos()
    ids[:, 3] = 96
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 28, 28)).logits
    assert out.shape[1] == 7 - 1 + 2


def test_save_and_reload_are_bitwise_and_hold_only_adapter_weights(tmp_path):
    model = lavin()
    ids, pixels = ids_with_bos(), torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all("mma_lavin_" in key for key in saved)
    assert not any(key.endswith("base_layer.weight") or ".encoder.blocks.0.mlp." in key for key in saved)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    assert PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True).get_nb_trainable_parameters() == (
        model.get_nb_trainable_parameters()
    )
    with torch.no_grad():
        after = loaded(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_auto_peft_model_loads_a_local_base(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), LaVINConfig(init_weights=False)).eval()
    model.save_pretrained(adapter_dir)
    ids = ids_with_bos()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        after = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.mark.parametrize("placement", ["attn", "block"])
def test_merge_keeps_logits_fp32_and_reloads_in_plain_transformers(tmp_path, placement):
    model = lavin(adapter_placement=placement, vision_model=None)
    ids = ids_with_bos()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        after = merged(input_ids=ids).logits
    assert type(merged) is LlamaForCausalLM and merged.config.attention_bias
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, atol=1e-5, rtol=0)


def test_merge_image_modality_and_unmerge_restores_weights():
    model = lavin()
    tuner = model.base_model
    q = tuner.model.model.layers[0].self_attn.base_layer.q_proj
    original = q.weight.detach().clone()
    ids = ids_with_bos()
    with torch.no_grad():
        routing = tuner._routing("default", tuner._new_call(None, None, 2), torch.ones(2, dtype=torch.bool), 2)
        image_routed = tuner.model(input_ids=ids, lavin_routing=routing).logits
        model.merge_adapter(modality="image")
        torch.testing.assert_close(model(input_ids=ids).logits, image_routed, atol=1e-5, rtol=0)
        model.unmerge_adapter()
    assert q.bias is None
    torch.testing.assert_close(q.weight, original, atol=1e-6, rtol=0)


def test_greedy_generate_with_cache_equals_without_and_batches_mixed_left_padded():
    model = lavin()
    ids, pixels = ids_with_bos(), torch.randn(2, 3, 28, 28)
    ids[1, :2] = 0  # left padding in row 1
    ids[1, 2] = 1
    mask = (ids != 0).long()
    image_mask = torch.tensor([True, False])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask, **kw)
        uncached = model.generate(
            input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask, use_cache=False, **kw
        )
        alone_image = model.generate(input_ids=ids[:1], pixel_values=pixels[:1], **kw)
        alone_text = model.generate(input_ids=ids[1:, 2:], **kw)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[0], alone_image[0])
    assert torch.equal(cached[1, 2:], alone_text[0])


def test_several_adapters_set_disable_delete():
    model = lavin(vision_model=None)
    model.add_adapter("other", LaVINConfig(init_weights=False, vision_model=None))
    ids = ids_with_bos()
    with torch.no_grad():
        first = model(input_ids=ids).logits
        model.set_adapter("other")
        second = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        model.set_adapter("default")
        torch.testing.assert_close(model(input_ids=ids).logits, first, atol=0, rtol=0)
    assert (first - second).abs().max() > 1e-4
    torch.testing.assert_close(base, tiny_llama()(input_ids=ids).logits, atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(".other" in n for n in trainable)
    model.delete_adapter("other")
    assert "other" not in model.peft_config and "other" not in model.base_model.mma_lavin_modality
    assert not any(".other" in n for n, _ in model.named_parameters())


def test_training_reaches_every_part_and_checkpointing_gives_the_same_grads():
    grads = []
    for checkpointing in (False, True):
        model = lavin(adapter_dropout=0.0)
        model.train()
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        ids, pixels = ids_with_bos(), torch.randn(2, 3, 28, 28)
        out = model(input_ids=ids, labels=ids, pixel_values=pixels, image_mask=torch.tensor([True, False]))
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0].values()), [
        n for n, g in grads[0].items() if g is None or g.abs().sum() == 0
    ]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "preset, width, layers, ffn, heads, expected",
    [
        ("lavin-7b", 4096, 32, 11008, 32, 3_781_296),
        ("lavin-13b", 5120, 40, 13824, 40, 5_390_080),
    ],
)
def test_trainable_parameter_counts_match_the_paper(preset, width, layers, ffn, heads, expected):
    config = LlamaConfig(
        hidden_size=width, num_hidden_layers=layers, intermediate_size=ffn, num_attention_heads=heads, vocab_size=32000
    )
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    model = get_peft_model(base, LaVINConfig.from_preset(preset, vision_pretrained=False))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected


def test_beam_search_with_images_expands_each_sample():
    model = lavin()
    ids, pixels = ids_with_bos(), torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels, num_beams=2, max_new_tokens=3, pad_token_id=0)
    assert out.shape == (2, 7 + 3)


def test_frozen_encoder_follows_the_base_dtype_and_adapters_stay_fp32():
    model = get_peft_model(tiny_llama().to(torch.bfloat16), LaVINConfig(**VISION)).eval()
    encoder = model.base_model.mma_lavin_visual["default"].encoder
    frozen = {p.dtype for n, p in encoder.named_parameters() if "mma_lavin_" not in n}
    adapters = {p.dtype for n, p in encoder.named_parameters() if "mma_lavin_" in n}
    assert frozen == {torch.bfloat16} and adapters == {torch.float32}
    with torch.no_grad():
        logits = model(input_ids=ids_with_bos(), pixel_values=torch.randn(2, 3, 28, 28)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
