"""LaVINModel through PEFT: identity, images in `input_ids`, save/load, merge, generate, several adapters, counts."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import LAVIN_VISION, greedy_without_cache, lavin_batch, model_for, tiny_lavin, tiny_llama, train_steps
from peft import PeftModel, PeftModelForCausalLM, get_peft_model
from stand_in_tokenizer import word_tokenizer
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from peft_mma import LaVINConfig
from peft_mma.attention import STATE_KWARG
from peft_mma.data import ImageTokens
from peft_mma.data.collator import CausalLMCollator


def test_logits_line_up_with_input_ids_and_labels_need_no_shifting():
    model = tiny_lavin()
    batch = lavin_batch(model, has_image=(True, False))
    assert batch["input_ids"].shape == (2, 9) and (batch["input_ids"][0, 1:3] == 97).all()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (2, 9, 97)
    labels = batch["labels"]
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)
    with torch.no_grad():  # labels equal to the ids: the placeholders (outside the vocabulary) are no targets
        same = model(**{**batch, "labels": batch["input_ids"]}).loss
    targets = batch["input_ids"].masked_fill(batch["input_ids"] == 97, -100)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten())
    torch.testing.assert_close(same, expected, atol=1e-6, rtol=0)


def test_mixed_batch_rows_equal_single_runs():
    model = tiny_lavin()
    batch = lavin_batch(model, has_image=(True, False))
    with torch.no_grad():
        mixed = model(**batch).logits
        image_only = model(input_ids=batch["input_ids"][:1], pixel_values=batch["pixel_values"][:1]).logits
        text_only = model(input_ids=batch["input_ids"][1:, :7]).logits
    torch.testing.assert_close(mixed[:1], image_only, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1:, :7], text_only, atol=1e-5, rtol=0)  # right-padded by 2


def test_placeholder_position_replaces_the_marked_token():
    model = tiny_lavin(image_token_position="placeholder", image_token_id=96)
    tokens = ImageTokens.from_config(model.peft_config["default"])
    ids = torch.tensor([[1, 5, 6, 96, 7, 8]])
    expanded = tokens.expand(ids)
    assert expanded["input_ids"].tolist() == [[1, 5, 6, 96, 96, 7, 8]]
    with torch.no_grad():
        out = model(**expanded, pixel_values=torch.randn(1, 3, 28, 28)).logits
    assert out.shape == (1, 7, 97)


@pytest.mark.parametrize("placement", ["attn", "block"])
def test_merge_keeps_logits_fp32_and_reloads_in_plain_transformers(tmp_path, placement):
    model = tiny_lavin(adapter_placement=placement, vision_model=None)
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        after = merged(input_ids=ids).logits
    assert type(merged) is LlamaForCausalLM and merged.config.attention_bias
    assert merged.config._attn_implementation == "eager"  # our attention function is gone with the adapters
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("base_biases", [False, True], ids=["llama", "q-k-v-biases"])
def test_merge_image_modality_and_unmerge_restores_weights(base_biases):
    """Merging folds the adapter into q/k/v (W′ = W(I + M), b′ = b + W c) and unmerging takes it out: weights back,
    and biases back where the base has its own (`attention_bias`), else none."""
    model = tiny_lavin(base=dict(attention_bias=base_biases))
    q = model.base_model.model.model.layers[0].self_attn.base_layer.q_proj
    if base_biases:
        with torch.no_grad():
            q.bias.normal_(0, 0.5)
    original = q.weight.detach().clone()
    original_bias = None if q.bias is None else q.bias.detach().clone()
    batch = lavin_batch(model, has_image=(True,))
    ids = batch["input_ids"]
    with torch.no_grad():
        image_routed = model(**batch).logits
        visual = model.base_model.encode_images(batch["pixel_values"])
        model.merge_adapter(modality="image")
        # merged, the adapter routes every sample as an image; feed the same visual tokens as embeddings
        embeds = model.base_model.model.get_input_embeddings()(ids.masked_fill(ids == 97, 0))
        embeds[0, 1:3] = visual[0]
        merged = model.base_model.model(inputs_embeds=embeds, **{STATE_KWARG: None}).logits
        torch.testing.assert_close(merged, image_routed, atol=1e-5, rtol=0)
        model.unmerge_adapter()
        torch.testing.assert_close(model(**batch).logits, image_routed, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.weight, original, atol=1e-6, rtol=0)
    if base_biases:
        torch.testing.assert_close(q.bias, original_bias, atol=1e-6, rtol=0)
    else:
        assert q.bias is None


@pytest.mark.parametrize("modality", ["text", "image"])
def test_merged_adapters_run_without_the_modality_token_and_keep_logits_and_tokens(modality):
    """Merged, the routing is in the weights: the call puts no modality token in front, so the decoder sees the
    caller's S positions with its own mask, and the logits and greedy tokens are the unmerged ones for that
    modality."""
    model = tiny_lavin()
    batch = lavin_batch(model, has_image=(True, True) if modality == "image" else (False, False))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    lengths = []
    first_layer = model.base_model.model.model.layers[0]
    first_layer.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        routed = model(**inputs).logits
        routed_tokens = model.generate(**inputs, do_sample=False, max_new_tokens=4, pad_token_id=0)
        model.merge_adapter(modality=modality)
        lengths.clear()
        merged = model(**inputs).logits
        assert lengths == [batch["input_ids"].shape[1]]  # S, not 1 + S
        merged_tokens = model.generate(**inputs, do_sample=False, max_new_tokens=4, pad_token_id=0)
        uncached = model.generate(**inputs, do_sample=False, max_new_tokens=4, pad_token_id=0, use_cache=False)
        model.unmerge_adapter()
        lengths.clear()
        unmerged = model(**inputs).logits
    assert lengths == [batch["input_ids"].shape[1] + 1]  # the token is back
    torch.testing.assert_close(merged, routed, atol=1e-5, rtol=0)
    torch.testing.assert_close(unmerged, routed, atol=1e-6, rtol=0)
    assert torch.equal(merged_tokens, routed_tokens) and torch.equal(uncached, merged_tokens)
    assert torch.equal(merged_tokens[:, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_beam_search_and_several_return_sequences_with_images():
    model = tiny_lavin()
    batch = lavin_batch(model, has_image=(True, False))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        beams = model.generate(**inputs, num_beams=2, max_new_tokens=3, pad_token_id=0)
        sampled = model.generate(**inputs, do_sample=True, num_return_sequences=3, max_new_tokens=3, pad_token_id=0)
        greedy = model.generate(**inputs, do_sample=False, max_new_tokens=3, pad_token_id=0)
        one_beam = model.generate(**inputs, num_beams=1, do_sample=False, max_new_tokens=3, pad_token_id=0)
    assert beams.shape == (2, 9 + 3) and torch.equal(beams[:, :9], batch["input_ids"])
    assert sampled.shape == (6, 9 + 3) and torch.equal(sampled[::3, :9], batch["input_ids"])
    assert torch.equal(greedy, one_beam)


def test_generate_encodes_images_and_routes_once_per_call(monkeypatch):
    """The encoder runs once per `generate` call, and each decoder adapter routes from the modality token once, at
    the prefill; the five decoding steps after it reuse those weights, and mix the two up-paths into U_b once, at
    the first of them. The tokens are those of the autograd node run on every step."""
    import peft_mma.lavin.layer as lavin_layer

    model = tiny_lavin()
    counts = {"routed": 0, "reused": 0, "mixed": 0, "images": 0}
    function, encode, paths = lavin_layer.RoutedAdapter, model.base_model.encode_images, lavin_layer.paths

    class Counting:
        @staticmethod
        def apply(*args):
            if not args[-2]:  # per sample: a decoder adapter (the encoder's route per token)
                counts["routed" if args[-1] is None else "reused"] += 1
            return function.apply(*args)

    def counting_encode(*args, **kwargs):
        counts["images"] += 1
        return encode(*args, **kwargs)

    def counting_paths(*args):
        counts["mixed"] += 1
        return paths(*args)

    batch = lavin_batch(model)
    monkeypatch.setattr(lavin_layer, "RoutedAdapter", Counting)
    monkeypatch.setattr(lavin_layer, "paths", counting_paths)
    monkeypatch.setattr(model.base_model, "encode_images", counting_encode)
    inputs = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"], "max_new_tokens": 6}
    with torch.no_grad():
        out = model.generate(**inputs)
    assert out.shape == (2, 9 + 6)
    assert counts == {"routed": 4, "reused": 0, "mixed": 4, "images": 1}  # 4 decoder layers
    # a decoding step's output is bitwise the autograd node's, which runs when gradients are on
    from peft_mma.lavin.inputs import LaVINCall

    adapter = model.base_model._llm_adapters()[1]
    key = f"{adapter.lavin_key}.default"
    call = LaVINCall(modality_token=False, routing={key: torch.tensor([[0.3, 0.7], [0.9, 0.1]])})
    x = torch.randn(2, 1, model.config.hidden_size)
    with torch.no_grad():
        first, second = adapter.adapted("default", x, call), adapter.adapted("default", x, call)
    node = adapter.adapted("default", x, call)
    assert node.requires_grad and counts["reused"] == 1 and list(call.mixed) == [key]
    assert torch.equal(first, node) and torch.equal(second, node)


def test_several_adapters_with_images_set_disable_delete(tmp_path):
    model = tiny_lavin()
    torch.manual_seed(2)
    model.add_adapter("other", LaVINConfig(init_weights=False, adapter_dropout=0.0, **LAVIN_VISION))
    tuner = model.base_model
    batch = lavin_batch(model)

    def logits(inputs=batch):
        with torch.no_grad():
            return model(**inputs).logits

    first = logits()
    model.set_adapter("other")
    second = logits()
    assert (first - second).abs().max() > 1e-3
    assert tuner.encode_images(batch["pixel_values"]).shape == (2, 2, 32)  # the other encoder and projector
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)  # its encoder adapters and projector included
    assert any("mma_lavin_visual.other." in n for n in trainable)
    text = {"input_ids": batch["input_ids"][1:, :7]}
    with model.disable_adapter():
        base = logits(text)  # the base model's logits
        with pytest.raises(ValueError, match="the LaVIN adapters are disabled: the base model cannot read images"):
            logits()
    torch.testing.assert_close(base, tiny_llama()(**text).logits, atol=0, rtol=0)

    model.save_pretrained(tmp_path, selected_adapters=["other"])  # "other" alone, loaded as "default", is the same
    alone = PeftModel.from_pretrained(tiny_llama(), tmp_path / "other").eval()
    with torch.no_grad():
        torch.testing.assert_close(alone(**batch).logits, second, atol=0, rtol=0)

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
    model = tiny_lavin(vision_model=None)
    model.add_adapter("other", LaVINConfig(init_weights=False, vision_model=None))
    ids = torch.randint(3, 97, (2, 7))
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


@pytest.mark.parametrize(
    "preset, width, layers, ffn, heads, expected, without_up_biases",
    [
        ("lavin-7b", 4096, 32, 11008, 32, 3_781_296, 3_781_296 - 2 * (32 * 4096 + 24 * 1024)),
        ("lavin-13b", 5120, 40, 13824, 40, 5_390_080, 5_390_080 - 2 * (40 * 5120 + 24 * 1024)),
    ],
)
def test_trainable_parameter_counts_match_the_paper(preset, width, layers, ffn, heads, expected, without_up_biases):
    config = LlamaConfig(
        hidden_size=width, num_hidden_layers=layers, intermediate_size=ffn, num_attention_heads=heads, vocab_size=32000
    )
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    model = get_peft_model(base, LaVINConfig.from_preset(preset, vision_pretrained=False))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert (model.peft_config["default"].image_token_id, model.peft_config["default"].num_image_tokens) == (32000, 6)
    with torch.device("meta"):  # b and d gone: 2·C per decoder layer and 2·1024 per ViT-L block
        base = LlamaForCausalLM(config)
    no_bias = LaVINConfig.from_preset(preset, vision_pretrained=False, adapter_bias=False)
    assert get_peft_model(base, no_bias).get_nb_trainable_parameters()[0] == without_up_biases
    with torch.device("meta"):  # `router="modality"`: no E_m (2·C) and no decoder router (2·C + 2 per layer)
        base = LlamaForCausalLM(config)
    by_modality = LaVINConfig.from_preset(preset, vision_pretrained=False, router="modality")
    assert (
        get_peft_model(base, by_modality).get_nb_trainable_parameters()[0]
        == {"lavin-7b": 3_510_896, "lavin-13b": 4_970_160}[preset]
        == expected - 2 * width - layers * (2 * width + 2)
    )


def test_peft_is_not_patched_and_no_call_state_is_left_on_modules():
    assert "special_peft_forward_args" not in vars(PeftModel)  # PEFT's own instance attribute, as PEFT sets it
    model = tiny_lavin()
    assert type(model) is PeftModelForCausalLM and model.peft_config["default"].task_type == "CAUSAL_LM"
    assert not {"pixel_values", "has_image"} & model.special_peft_forward_args

    def attributes():  # PEFT's own `generate` leaves `prepare_inputs_for_generation` on the tuner
        return {name: set(vars(m)) - {"prepare_inputs_for_generation"} for name, m in model.named_modules()}

    before = attributes()
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    batch = lavin_batch(model)
    with torch.no_grad():
        through_peft = model(**batch).logits
        through_tuner = model.base_model(**batch).logits
        model.generate(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], max_new_tokens=2)
    torch.testing.assert_close(through_peft, through_tuner, atol=0, rtol=0)
    assert attributes() == before
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks == 0


def test_trainer_with_the_collator_trains_every_part_from_a_mixed_batch(tmp_path):
    model = tiny_lavin()
    texts = ["What is shown ?", "It is a cat .", "Say hello .", "hello"]
    samples = [
        {"prompt": texts[0], "response": texts[1], "image": torch.randn(3, 28, 28)},
        {"prompt": texts[2], "response": texts[3]},
    ] * 2
    tokens = ImageTokens.from_config(model.peft_config["default"])
    collator = CausalLMCollator(word_tokenizer(texts=texts, add_bos=True), image_size=28, image_tokens=tokens)
    batch = collator(samples)
    assert batch["has_image"].tolist() == [True, False, True, False]
    assert (batch["input_ids"] == 97).sum(-1).tolist() == [2, 0, 2, 0] and batch["input_ids"][0, 1] == 97
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
    assert (moved > 0).all()  # both rows, text (0) and image (1): each sample's modality reached the tuner


def test_encoder_adapters_use_dropout_in_train_mode_while_the_encoder_stays_in_eval():
    model = tiny_lavin(adapter_dropout=0.5)
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


def test_frozen_encoder_follows_the_base_dtype_and_adapters_stay_fp32():
    model = get_peft_model(tiny_llama().to(torch.bfloat16), LaVINConfig(**LAVIN_VISION)).eval()
    encoder = model.base_model.mma_lavin_visual["default"].encoder
    frozen = {p.dtype for n, p in encoder.named_parameters() if "mma_lavin_" not in n}
    adapters = {p.dtype for n, p in encoder.named_parameters() if "mma_lavin_" in n}
    assert frozen == {torch.bfloat16} and adapters == {torch.float32}
    batch = lavin_batch(model)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_adapters_without_up_biases_train_save_and_merge(tmp_path):
    """`adapter_bias=False`: the up-projections B, D have no biases (2·C fewer parameters per adapter, none saved),
    the adapter trains through its other parameters, and the saved adapter reloads and merges to the same logits."""
    official = get_peft_model(tiny_llama(), LaVINConfig(**LAVIN_VISION))
    up_biases = {n: p.numel() for n, p in official.named_parameters() if ".mma_lavin_up" in n and n.endswith(".bias")}
    assert len(up_biases) == 2 * (4 + 4)  # two paths in each of 4 decoder layers and 4 encoder blocks
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LaVINConfig(adapter_bias=False, adapter_dropout=0.0, **LAVIN_VISION))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".mma_lavin_up" in n and n.endswith(".bias") for n in names)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in official.parameters() if p.requires_grad) - sum(up_biases.values())

    batch = lavin_batch(model)
    ups = {n: p.detach().clone() for n, p in model.named_parameters() if ".mma_lavin_up" in n}
    losses = train_steps(model, batch, 5)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, ups[n]) for n, p in model.named_parameters() if n in ups)  # every path moved

    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert reloaded.peft_config["default"].adapter_bias is False
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained, atol=0, rtol=0)
    text = {"input_ids": batch["input_ids"][1:, :7]}  # the text-only sample: merged, every sample routes as text
    with torch.no_grad():
        routed = reloaded(**text).logits
        merged = reloaded.merge_and_unload()(**text).logits
    torch.testing.assert_close(merged, routed, atol=1e-5, rtol=0)


def test_projector_init_scale_scales_the_output_layer_and_nothing_else():
    """`projector_init_scale` multiplies W₂'s xavier init (same draws), and leaves W₁, the biases and every other
    part as the official init makes them."""
    parts = {}
    for scale in (1.0, 0.25):
        model = model_for("lavin-image", init_weights=True, projector_init_scale=scale)
        parts[scale] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = [n for n in parts[1.0] if "proj_out" in n and n.endswith("weight")]
    assert len(out) == 1
    for name, value in parts[1.0].items():
        expected = value * 0.25 if name in out else value
        torch.testing.assert_close(parts[0.25][name], expected, rtol=1e-6, atol=0, msg=name)
    bound = 6**0.5 / sum(parts[1.0][out[0]].shape) ** 0.5  # xavier-uniform's bound
    assert 0.9 * bound < parts[1.0][out[0]].abs().max() <= bound


@pytest.mark.parametrize("router", ["learnt", "modality"])
def test_tuple_outputs_kept_logits_and_generate_lengths_are_those_of_input_ids(router):
    """`return_dict=False` and `logits_to_keep` as positions see the caller's sequence, not the one with the
    modality token in front; `generate(max_length=...)` gives as many new tokens as the base does."""
    model = tiny_lavin(router=router)
    batch = lavin_batch(model)
    batch.pop("labels")
    with torch.no_grad():
        full = model(**batch).logits
        as_tuple = model(**batch, return_dict=False)
        kept = model(**batch, logits_to_keep=torch.tensor([3, 5, -1])).logits
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], full)
    assert full.shape[1] == batch["input_ids"].shape[1]
    torch.testing.assert_close(kept, full[:, [3, 5, -1]], atol=1e-6, rtol=0)
    text = {"input_ids": torch.tensor([[1, 5, 6, 7, 8, 9, 10]])}
    with torch.no_grad():
        new = model.generate(**text, max_length=10, min_length=10, do_sample=False, eos_token_id=None)
        with model.disable_adapter():
            base = model.generate(**text, max_length=10, min_length=10, do_sample=False, eos_token_id=None)
    assert new.shape == base.shape == (1, 10)
    with torch.no_grad():  # a max_length in the generation config counts the caller's prompt too
        for config in (GenerationConfig(max_length=12, do_sample=False), GenerationConfig(do_sample=False)):
            new = model.generate(**text, generation_config=config, eos_token_id=None)
            with model.disable_adapter():
                base = model.generate(**text, generation_config=config, eos_token_id=None)
            assert new.shape == base.shape and (config.max_length is None or new.shape[1] == 12)
        short = model.generate(**text, max_new_tokens=2, do_sample=False, eos_token_id=None)
    assert short.shape == (1, 7 + 2)


@pytest.mark.parametrize(
    ("router", "placement", "merged"),
    [("modality", "attn", False), ("learnt", "attn", True), ("learnt", "block", True), ("learnt", "block", False)],
)
def test_generate_without_a_mask_sees_the_image_merged_or_not_in_every_placement(router, placement, merged):
    """`generate` without `attention_mask`, pad id 0 (the placeholders' stand-in id): the image still counts, and a
    merged 'block' adapter takes no call state; the tokens are those of a full forward per step."""
    model = tiny_lavin(router=router, adapter_placement=placement)
    if merged:
        model.merge_adapter(modality="image")
    batch = lavin_batch(model, has_image=(True,))
    batch.pop("labels")
    expected = greedy_without_cache(model, batch, steps=4, eos=-1)
    with torch.no_grad():
        new = model.generate(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], max_new_tokens=4, do_sample=False,
            pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    assert torch.equal(new, expected)


@pytest.mark.parametrize(("router", "merged"), [("learnt", False), ("learnt", True), ("modality", False)])
def test_generate_without_a_mask_infers_it_as_transformers_does(router, merged):
    """No `attention_mask`: left padding (pad id 0, in the ids, not EOS) is masked as transformers masks it for a
    plain LLaMA, so the tokens are those with the caller's mask; `inputs_embeds` alone count every position."""
    model = tiny_lavin(router=router)
    if merged:
        model.merge_adapter(modality="text")
    batch = lavin_batch(model, has_image=(False, False))
    batch["input_ids"][0] = torch.cat([torch.zeros(2, dtype=torch.long), batch["input_ids"][0, :-2]])  # left pad
    batch["attention_mask"][0, :2] = 0
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        masked = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **settings)
        inferred = model.generate(input_ids=batch["input_ids"], **settings)
        embeds = model.get_input_embeddings()(batch["input_ids"][1:])
        from_embeds = model.generate(inputs_embeds=embeds, **settings)
        with_ones = model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2]).long(), **settings
        )
    assert batch["attention_mask"][0, 0] == 0 and torch.equal(inferred, masked)
    assert torch.equal(from_embeds, with_ones) and from_embeds.shape == (1, 4)


@pytest.mark.parametrize("has_image", [(True, True), (False,)], ids=["images", "text"])
def test_generate_processors_that_read_the_prompt_see_only_the_caller_s_ids(has_image):
    """`repetition_penalty` reads the set of prompt ids: the modality token's and the placeholders' stand-ins are
    ids of the row itself (its BOS here), so the scores are the penalty applied to the caller's ids with BOS at the
    placeholders (which lie outside the vocabulary), and the never-passed id 0 is not penalised."""
    from transformers import RepetitionPenaltyLogitsProcessor

    model = tiny_lavin()
    batch = lavin_batch(model, has_image=has_image)
    batch.pop("labels")
    assert not (batch["input_ids"] == 0).any()
    with torch.no_grad():
        output = model.generate(
            **batch, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None, repetition_penalty=2.0,
            return_dict_in_generate=True, output_scores=True, output_logits=True,
        )  # fmt: skip
    length, penalty = batch["input_ids"].shape[1], RepetitionPenaltyLogitsProcessor(2.0)
    for step, (scores, logits) in enumerate(zip(output.scores, output.logits)):
        seen = output.sequences[:, : length + step].masked_fill(output.sequences[:, : length + step] == 97, 1)
        torch.testing.assert_close(scores, penalty(seen, logits.clone()), atol=0, rtol=0)


def test_generate_hidden_states_have_the_caller_length():
    """`output_hidden_states` of `generate`: the prefill's rows are the caller's S positions, as in a forward."""
    model = tiny_lavin()
    batch = lavin_batch(model)
    batch.pop("labels")
    with torch.no_grad():
        forward = model(**batch, output_hidden_states=True).hidden_states
        output = model.generate(
            **batch, max_new_tokens=2, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
            output_hidden_states=True,
        )  # fmt: skip
    prefill, real = output.hidden_states[0], batch["attention_mask"].bool()  # the text row is padded on the right
    assert len(prefill) == len(forward)
    for generated, expected in zip(prefill, forward):
        assert generated.shape == expected.shape == (2, batch["input_ids"].shape[1], expected.shape[-1])
        torch.testing.assert_close(generated[real], expected[real], atol=1e-5, rtol=0)
    assert output.hidden_states[1][0].shape[1] == 1


@pytest.mark.parametrize("has_image", [(True, False), (False, False)])
def test_logits_are_contiguous_and_the_loss_is_transformers_own(has_image):
    """The LM head reads the caller's S positions only, so the logits are a plain contiguous (B, S, V) tensor that
    transformers' `loss_function` (`.view(-1, V)`) takes, giving the model's own loss; the token in front predicts
    nothing, even where the caller's first label is a target."""
    model = tiny_lavin()
    batch = lavin_batch(model, has_image=has_image)
    batch["labels"][:, 0] = batch["input_ids"][:, 0]  # a target at position 0: no position predicts it
    with torch.no_grad():
        output = model(**batch)
    assert output.logits.is_contiguous() and output.logits.shape[:2] == batch["input_ids"].shape
    expected = model.base_model.model.loss_function(output.logits, batch["labels"], vocab_size=97)
    torch.testing.assert_close(output.loss, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("router", ["learnt", "modality"])
def test_an_adapter_scale_other_than_one_counts_on_every_path(router):
    """s scales the adapter in training forwards, in forwards without gradients and in `generate`'s decoding
    steps alike: the logits agree, and each decoding step's logits are the full forward's at that position."""
    model = tiny_lavin(adapter_scale=0.5, router=router)
    batch = lavin_batch(model, has_image=(True, False), left=True)  # the text-only row is shorter: padded for generate
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        no_grad = model(**inputs).logits
    with_grad = model(**inputs).logits.detach()
    torch.testing.assert_close(no_grad, with_grad, atol=1e-5, rtol=0)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        mask = torch.cat(
            [inputs["attention_mask"], torch.ones_like(out.sequences[:, inputs["input_ids"].shape[1] :])], 1
        )
        full = model(**{**inputs, "input_ids": out.sequences, "attention_mask": mask}).logits
    start = inputs["input_ids"].shape[1] - 1
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, start + step], atol=1e-5, rtol=0)


def test_routing_and_merging_in_train_mode_ignore_dropout():
    """`modality_routing` and the merge it feeds run the model in eval mode: with adapter dropout and the model in
    train mode, the routing is the same on every call and the merged model gives the eval-mode merge's logits."""
    model = tiny_lavin(adapter_dropout=0.5)
    batch = {k: v for k, v in lavin_batch(model, has_image=(False, False)).items() if k != "labels"}
    model.train()
    first, second = model.base_model.modality_routing(), model.base_model.modality_routing()
    assert all(torch.equal(first[key], second[key]) for key in first) and model.training
    evaluated = copy.deepcopy(model).eval().merge_and_unload(modality="text")
    trained = model.merge_and_unload(modality="text")
    with torch.no_grad():
        torch.testing.assert_close(trained.eval()(**batch).logits, evaluated(**batch).logits, atol=0, rtol=0)


def test_the_projector_starts_with_zero_biases():
    """The projector's two linears: xavier weights, zero biases (spec `lavin_mma.md` §4)."""
    model = tiny_lavin(init_weights=True)
    for role in ("mma_lavin_proj_in", "mma_lavin_proj_out"):
        linear = getattr(model.base_model, role)["default"]
        linears = [m for m in linear.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linears), role
        assert all(m.weight.abs().sum() > 0 for m in linears), role


def test_generate_without_a_mask_keeps_a_pad_id_that_is_also_eos_in_the_prompt():
    """As transformers infers it: where the pad id is an EOS id too, its occurrences in the prompt are tokens, not
    padding, so the call equals one with an all-ones mask."""
    model = tiny_lavin()
    batch = lavin_batch(model, has_image=(False,))
    ids = batch["input_ids"]
    ids[0, 3] = 2  # EOS inside the prompt
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=2, eos_token_id=2)
    with torch.no_grad():
        inferred = model.generate(input_ids=ids, **settings)
        ones = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
        masked = model.generate(input_ids=ids, attention_mask=(ids != 2).long(), **settings)
    assert torch.equal(inferred, ones)
    assert not torch.equal(masked, ones)  # the id's position would matter if it were masked


def test_reloading_an_adapter_with_vision_reports_no_missing_keys(tmp_path):
    """The frozen encoder is rebuilt from the config and never saved; loading does not call its weights missing."""
    model = tiny_lavin()
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not [w for w in caught if "missing adapter keys" in str(w.message).lower()]
