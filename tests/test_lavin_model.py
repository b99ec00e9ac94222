"""LaVINModel through PEFT: identity, images, save/load, merge, generate, several adapters, parameter counts."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VIT, tiny_llama
from peft import AutoPeftModelForCausalLM, PeftModel, PeftModelForCausalLM, get_peft_model
from reference.lavin_ref import adapter_tensors, official_logits
from safetensors.torch import load_file
from stand_in_tokenizer import word_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from peft_mma import LaVINConfig
from peft_mma.data.collator import CausalLMCollator
from peft_mma.lavin.call import Call

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
        mixed = model(input_ids=ids, pixel_values=pixels, has_image=torch.tensor([True, False]), labels=labels)
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
        routing = tuner._routing("default", Call(), torch.ones(2, dtype=torch.bool), 2)
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
    has_image = torch.tensor([True, False])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, has_image=has_image, **kw)
        uncached = model.generate(
            input_ids=ids, attention_mask=mask, pixel_values=pixels, has_image=has_image, use_cache=False, **kw
        )
        alone_image = model.generate(input_ids=ids[:1], pixel_values=pixels[:1], **kw)
        alone_text = model.generate(input_ids=ids[1:, 2:], **kw)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[0], alone_image[0])
    assert torch.equal(cached[1, 2:], alone_text[0])


def test_several_adapters_with_images_set_disable_delete(tmp_path):
    model = lavin()
    torch.manual_seed(2)
    model.add_adapter("other", LaVINConfig(init_weights=False, adapter_dropout=0.0, **VISION))
    tuner = model.base_model
    ids, pixels, has_image = ids_with_bos(), torch.randn(2, 3, 28, 28), torch.tensor([True, False])

    def logits():
        with torch.no_grad():
            return model(input_ids=ids, pixel_values=pixels, has_image=has_image).logits

    first = logits()
    model.set_adapter("other")
    second = logits()
    assert (first - second).abs().max() > 1e-3
    assert tuner.encode_images(pixels).shape == (2, 2, 32)  # through the other adapter's encoder and projector
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)  # its encoder adapters and projector included
    assert any("mma_lavin_visual.other." in n for n in trainable)
    with model.disable_adapter():
        base = logits()[:, :7]  # images are ignored: the base model's logits
    torch.testing.assert_close(base, tiny_llama()(input_ids=ids).logits, atol=0, rtol=0)

    model.save_pretrained(tmp_path, selected_adapters=["other"])  # "other" alone, loaded as "default", is the same
    alone = PeftModel.from_pretrained(tiny_llama(), tmp_path / "other").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            alone(input_ids=ids, pixel_values=pixels, has_image=has_image).logits, second, atol=0, rtol=0
        )

    model.set_adapter("default")
    torch.testing.assert_close(logits(), first, atol=0, rtol=0)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    for role in ("modality", "visual", "proj_in", "proj_out"):
        assert "other" not in getattr(tuner, f"mma_lavin_{role}")
    assert not any(".other" in key for key in model.state_dict())
    assert sum(1 for m in model.modules() if type(m).__name__ == "VisionBackbone") == 1
    torch.testing.assert_close(logits(), first, atol=0, rtol=0)


def test_several_active_adapters_are_refused_and_change_nothing():
    model = lavin(vision_model=None)
    model.add_adapter("other", LaVINConfig(init_weights=False, vision_model=None))
    ids = ids_with_bos()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.raises(ValueError, match=r"LaVIN runs one adapter at a time .* got active adapters \['default', 'o"):
        model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(".other" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="Adapter 'nope' does not exist"):
        model.base_model.set_adapter("nope")


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
        out = model(input_ids=ids, labels=ids, pixel_values=pixels, has_image=torch.tensor([True, False]))
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


def test_peft_is_not_patched_and_the_causal_lm_wrapper_passes_images_to_the_tuner():
    assert "special_peft_forward_args" not in vars(PeftModel)  # PEFT's own instance attribute, as PEFT sets it
    model = lavin()
    assert type(model) is PeftModelForCausalLM and model.peft_config["default"].task_type == "CAUSAL_LM"
    assert not {"pixel_values", "has_image"} & model.special_peft_forward_args
    ids, pixels = ids_with_bos(), torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        through_peft = model(input_ids=ids, pixel_values=pixels, has_image=torch.tensor([True, False])).logits
        through_tuner = model.base_model(input_ids=ids, pixel_values=pixels, has_image=torch.tensor([True, False]))
    assert through_peft.shape == (2, 7 + 2, 97)  # row 0 got 2 visual tokens, row 1 is right-padded
    torch.testing.assert_close(through_peft, through_tuner.logits, atol=0, rtol=0)


def test_trainer_with_the_collator_trains_every_part_from_a_mixed_batch(tmp_path):
    model = lavin()
    texts = ["What is shown ?", "It is a cat .", "Say hello .", "hello"]
    samples = [
        {"prompt": texts[0], "response": texts[1], "image": torch.randn(3, 28, 28)},
        {"prompt": texts[2], "response": texts[3]},
    ] * 2
    collator = CausalLMCollator(word_tokenizer(texts=texts, add_bos=True), image_size=28)
    assert collator(samples)["has_image"].tolist() == [True, False, True, False]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
        report_to=[], save_strategy="no", remove_unused_columns=False, use_cpu=True,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    Trainer(model=model, args=args, train_dataset=samples, data_collator=collator).train()
    after = dict(model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(after[n], p)]
    assert not unchanged, unchanged  # the projector and the encoder adapters: `pixel_values` reached the tuner
    modality = model.base_model.mma_lavin_modality["default"]
    moved = (modality - before[next(n for n in before if "mma_lavin_modality" in n)]).abs().amax(dim=1)
    assert (moved > 0).all()  # both rows, text (0) and image (1): `has_image` reached the tuner


def test_encoder_adapters_use_dropout_in_train_mode_while_the_encoder_stays_in_eval():
    model = lavin(adapter_dropout=0.5)
    tuner, pixels = model.base_model, torch.randn(2, 3, 28, 28)
    encoder = tuner.mma_lavin_visual["default"].encoder

    def features_twice():
        with torch.no_grad():
            return tuner.encode_images(pixels), tuner.encode_images(pixels)

    def modes():
        parts = [m.training for n, m in encoder.named_modules() if "mma_lavin_" in n]
        own = [m.training for n, m in encoder.named_modules() if "mma_lavin_" not in n]
        return set(parts), set(own)

    first, second = features_twice()
    assert torch.equal(first, second) and modes() == ({False}, {False})
    model.train()
    first, second = features_twice()
    assert (first - second).abs().max() > 1e-3  # each call draws its own dropout mask
    assert modes() == ({True}, {False})  # the encoder's own modules (timm dropout, drop-path) stay off
    dropouts = [m for n, m in encoder.named_modules() if n.endswith("mma_lavin_dropout.default")]
    assert len(dropouts) == 4 and all(isinstance(m, torch.nn.Dropout) and m.training for m in dropouts)
    model.eval()
    first, second = features_twice()
    assert torch.equal(first, second) and modes() == ({False}, {False})


def test_generate_encodes_images_and_routes_once_per_call(monkeypatch):
    """The modality side pass and the image encoder run once per `generate` call, not once per decoding step."""
    import peft_mma.lavin.model as lavin_model

    model = lavin()
    counts = {"side pass": 0, "images": 0}
    side_pass, encode = lavin_model.modality_side_pass, model.base_model.encode_images

    def counting_side_pass(*args, **kwargs):
        counts["side pass"] += 1
        return side_pass(*args, **kwargs)

    def counting_encode(*args, **kwargs):
        counts["images"] += 1
        return encode(*args, **kwargs)

    monkeypatch.setattr(lavin_model, "modality_side_pass", counting_side_pass)
    monkeypatch.setattr(model.base_model, "encode_images", counting_encode)
    ids, pixels = ids_with_bos(), torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7 + 6)
    assert counts == {"side pass": 1, "images": 1}


def test_frozen_encoder_follows_the_base_dtype_and_adapters_stay_fp32():
    model = get_peft_model(tiny_llama().to(torch.bfloat16), LaVINConfig(**VISION)).eval()
    encoder = model.base_model.mma_lavin_visual["default"].encoder
    frozen = {p.dtype for n, p in encoder.named_parameters() if "mma_lavin_" not in n}
    adapters = {p.dtype for n, p in encoder.named_parameters() if "mma_lavin_" in n}
    assert frozen == {torch.bfloat16} and adapters == {torch.float32}
    with torch.no_grad():
        logits = model(input_ids=ids_with_bos(), pixel_values=torch.randn(2, 3, 28, 28)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
