"""LLaMA-Adapter V2 through PEFT: identity at init, save/load, merging, several adapters, generate, counts."""

from __future__ import annotations

import pytest
import torch
from conftest import V2_VISION, logits_of, tiny_llama, token_ids, train_steps
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_mma import LlamaAdapterV2Config
from peft_mma.llama_adapter_v2.layer import OutputProjection


def test_trained_adapter_changes_only_adapter_parameters():
    base = tiny_llama("gqa", "sdpa")
    model = get_peft_model(base, LlamaAdapterV2Config(**V2_VISION, lora_modules=["q_proj", "v_proj"], r=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = token_ids(4, 9)
    train_steps(model, {"input_ids": x, "labels": x, "pixel_values": torch.randn(4, 3, 28, 28)}, 3)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all("mma_adapter_v2_" in n for n in trainable)
    assert not any("backbone" in n for n in trainable)
    # every trainable group moved: bias, scale, norm, prompt, gate, LoRA B, the visual bridge
    for role in ("_bias.", "_scale.", "_norm.", "_prompt.", "_gate.", "_lora_B.", "_visual."):
        assert any(role in n for n in changed), role


@pytest.mark.parametrize(
    "options",
    [
        dict(scale_side="output"),
        dict(scale_side="input"),
        dict(scale_side="output", lora_modules=["q_proj", "down_proj"], r=2, lora_alpha=4),
        dict(bias_modules=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], scale_modules=[]),
    ],
    ids=["output-scale", "input-scale", "lora", "bias-7b-linears"],
)
@pytest.mark.parametrize("base_biases", [False, True], ids=["llama", "base-with-biases"])
def test_merge_and_unmerge_keep_logits_for_either_scale_side_and_lora(options, base_biases):
    """The logits hold through merge and unmerge, and unmerging gives back every base weight and bias, also on a
    base whose linears have biases of their own (`attention_bias`, `mlp_bias`), into which b is folded."""
    base = tiny_llama("gqa", "eager", attention_bias=base_biases, mlp_bias=base_biases)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.5)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, LlamaAdapterV2Config(init_weights=False, **options))
    x = token_ids()
    expected = logits_of(model, input_ids=x)
    model.base_model.merge_adapter()
    torch.testing.assert_close(logits_of(model, input_ids=x), expected, atol=1e-5, rtol=0)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(logits_of(model, input_ids=x), expected, atol=1e-5, rtol=0)
    after = {n.replace("base_model.model.", "", 1).replace(".base_layer", ""): p for n, p in model.named_parameters()}
    for name, value in original.items():
        torch.testing.assert_close(after[name], value, atol=1e-6, rtol=0, msg=name)


def test_merge_and_unload_gives_a_plain_llama_that_vanilla_transformers_reloads(tmp_path):
    model = get_peft_model(tiny_llama("mha", "sdpa"), LlamaAdapterV2Config(prompt_layers=0, init_weights=False))
    x = token_ids()
    expected = logits_of(model, input_ids=x)
    merged = model.merge_and_unload()
    assert type(merged) is LlamaForCausalLM and merged.config._attn_implementation == "sdpa"
    assert merged.config.attention_bias and merged.config.mlp_bias
    torch.testing.assert_close(logits_of(merged, input_ids=x), expected, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(reloaded, input_ids=x), expected, atol=1e-5, rtol=0)


def test_merge_and_unload_refuses_prompts_and_leaves_the_model_unchanged():
    model = get_peft_model(tiny_llama(), LlamaAdapterV2Config(init_weights=False))
    x = token_ids()
    expected = logits_of(model, input_ids=x)
    with pytest.raises(ValueError, match="adaption prompts, which cannot be merged"):
        model.merge_and_unload()
    assert torch.equal(logits_of(model, input_ids=x), expected)


def test_merge_and_unload_folds_the_k_and_v_that_another_adapter_s_prompts_read():
    """`merge_adapter` keeps k_proj / v_proj apart where another adapter's prompts read them through the frozen
    weights; `merge_and_unload` drops those prompts, so it folds them too (they were left out, silently)."""
    model = get_peft_model(tiny_llama("gqa", "sdpa"), LlamaAdapterV2Config(init_weights=False)).eval()  # prompted
    torch.manual_seed(5)
    model.add_adapter("mergeable", LlamaAdapterV2Config(init_weights=False, prompt_layers=0))
    model.set_adapter("mergeable")
    x = token_ids()
    expected = logits_of(model, input_ids=x)
    plain = model.merge_and_unload()
    torch.testing.assert_close(logits_of(plain, input_ids=x), expected, atol=1e-5, rtol=0)


def test_several_adapters_set_disable_delete():
    base = tiny_llama("gqa", "sdpa")
    x = token_ids()
    plain = logits_of(base, input_ids=x)
    model = get_peft_model(base, LlamaAdapterV2Config(init_weights=False))
    first = logits_of(model, input_ids=x)
    model.add_adapter("other", LlamaAdapterV2Config(init_weights=False, scale_side="input", prompt_layers=2))
    assert torch.equal(logits_of(model, input_ids=x), first)  # adding does not activate
    model.set_adapter("other")
    second = logits_of(model, input_ids=x)
    assert not torch.allclose(second, first)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".default" in n)
    with model.disable_adapter():
        torch.testing.assert_close(logits_of(model, input_ids=x), plain, atol=1e-6, rtol=0)
    model.set_adapter("default")
    assert torch.equal(logits_of(model, input_ids=x), first)
    model.delete_adapter("other")
    assert not any(".other" in n for n, _ in model.named_parameters())
    assert torch.equal(logits_of(model, input_ids=x), first)


def generate(model, input_ids, attention_mask=None, **kwargs):
    with torch.no_grad():
        return model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids) if attention_mask is None else attention_mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )


def test_prompt_key_values_are_projected_once_per_generate_call(monkeypatch):
    model = get_peft_model(tiny_llama(), LlamaAdapterV2Config(**V2_VISION, init_weights=False)).eval()
    calls = []
    original = OutputProjection._project
    monkeypatch.setattr(OutputProjection, "_project", lambda self, *a: calls.append(1) or original(self, *a))
    generate(model, token_ids(2, 5), pixel_values=torch.randn(2, 3, 28, 28))
    prompted_layers = 3  # 4 layers, all but the first; k_p and v_p each once
    assert len(calls) == 2 * prompted_layers


def test_a_decoding_loop_on_prepare_inputs_for_generation_keeps_the_images():
    """transformers hands `pixel_values` to the prefill only; V2 reads V at every step, so a loop written on PEFT's
    `prepare_inputs_for_generation` (with a cache) gets them at each step and the logits of `generate`."""
    from transformers import DynamicCache

    model = get_peft_model(tiny_llama(), LlamaAdapterV2Config(**V2_VISION, init_weights=False)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "_gate." in name:
                parameter.normal_(0, 3.0, generator=torch.Generator().manual_seed(0))  # let the prompts count
    ids, images, steps = token_ids(2, 6), torch.randn(2, 3, 28, 28), 3
    has_image = torch.tensor([True, False])
    with torch.no_grad():
        expected = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=images, has_image=has_image,
            max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
            output_logits=True,
        )  # fmt: skip
        cache, sequence = DynamicCache(config=model.config), ids
        for step in range(steps):
            inputs = model.prepare_inputs_for_generation(  # the cache by position: its keyword's name moved in 5.24
                sequence, None if step == 0 else 1, cache, attention_mask=torch.ones_like(sequence),
                pixel_values=images, has_image=has_image, use_cache=True, is_first_iteration=step == 0,
            )  # fmt: skip
            assert inputs["pixel_values"] is images and inputs["has_image"] is has_image
            logits = model(**inputs).logits[:, -1]
            torch.testing.assert_close(logits, expected.logits[step], atol=1e-5, rtol=0)
            sequence = torch.cat([sequence, expected.sequences[:, ids.shape[1] + step, None]], dim=1)


def test_text_only_batch_mixing_images_uses_has_image():
    model = get_peft_model(tiny_llama(), LlamaAdapterV2Config(**V2_VISION, init_weights=False)).eval()
    x, images = token_ids(2, 6), torch.randn(2, 3, 28, 28)
    mixed = logits_of(model, input_ids=x, pixel_values=images, has_image=torch.tensor([True, False]))
    torch.testing.assert_close(
        mixed[0], logits_of(model, input_ids=x[:1], pixel_values=images[:1])[0], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(mixed[1], logits_of(model, input_ids=x[1:])[0], atol=1e-5, rtol=0)


def test_zero_image_for_text_equals_passing_a_zero_image():
    config = LlamaAdapterV2Config(**V2_VISION, init_weights=False, zero_image_for_text=True)
    model = get_peft_model(tiny_llama(), config).eval()
    x = token_ids(2, 6)
    torch.testing.assert_close(
        logits_of(model, input_ids=x),
        logits_of(model, input_ids=x, pixel_values=torch.zeros(2, 3, 28, 28)),
        atol=1e-6,
        rtol=0,
    )


def count_trainable(config: LlamaAdapterV2Config, **llama) -> int:
    with torch.device("meta"):
        base = LlamaForCausalLM(LlamaConfig(**llama))
    model = get_peft_model(base, config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


LLAMA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
)
LLAMA_65B = dict(
    hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64, vocab_size=32000
)


def test_parameter_counts_of_the_presets_match_the_spec():
    vision = dict(vision_pretrained=False)
    assert count_trainable(LlamaAdapterV2Config.from_preset("BIAS-7B", **vision), **LLAMA_7B) == 63_095_552
    assert count_trainable(LlamaAdapterV2Config.from_preset("CHAT-65B"), **LLAMA_65B) == 13_811_712
    lora = count_trainable(LlamaAdapterV2Config.from_preset("LORA-BIAS-7B", **vision), **LLAMA_7B)
    assert lora == 63_095_552 + 39_976_960 + 32
    caption = count_trainable(LlamaAdapterV2Config.from_preset("CAPTION-7B", **vision), **LLAMA_7B)
    biases, norms = 32 * (2 * 4096 + 2 * 11008 + 4096), (2 * 32 + 1) * 4096
    assert caption == 63_095_552 - biases - norms == 61_731_584


def test_lora_weights_reload_under_any_adapter_name_and_from_files_that_kept_the_name(tmp_path):
    """The saved keys of V2's LoRA matrices carry no adapter name, like every other part's, so the adapter reloads
    under any name; a file from before, whose `…lora_A.<name>.weight` keys kept it, reloads the same."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    config = LlamaAdapterV2Config(init_weights=False, lora_modules=["q_proj", "v_proj"], r=2, prompt_length=3)
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama("gqa"), config).eval()
    with torch.no_grad():  # LoRA weights of their own, which no fresh init reproduces
        for name, p in model.named_parameters():
            if "_lora_" in name:
                p.normal_(0, 0.3)
    ids = token_ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "new")
    saved = load_file(tmp_path / "new" / "adapter_model.safetensors")
    lora = [k for k in saved if "lora_A" in k]
    assert lora and all(k.endswith("mma_adapter_v2_lora_A.weight") for k in lora)
    old = tmp_path / "old"
    model.save_pretrained(old)
    renamed = {k.replace("_lora_A.", "_lora_A.default.").replace("_lora_B.", "_lora_B.default."): v
               for k, v in saved.items()}  # fmt: skip
    save_file(renamed, old / "adapter_model.safetensors")
    for folder in ("new", "old"):
        for name in ("default", "other"):
            torch.manual_seed(123)  # other random LoRA weights at init: the loaded ones must replace them
            loaded = PeftModel.from_pretrained(tiny_llama("gqa"), tmp_path / folder, adapter_name=name).eval()
            with torch.no_grad():
                torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=0, rtol=0)


@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("lora", [[], ["q_proj", "k_proj"]], ids=["no-lora", "lora"])
def test_several_adapters_merge_to_their_joint_forward_and_unmerge_to_the_base(side, lora):
    """Two active adapters: their forward multiplies the scales and adds the biases and LoRA terms; merged one
    after the other they give the same logits, and unmerged the base weights."""
    kw = dict(init_weights=False, prompt_layers=0, scale_side=side, lora_modules=lora, r=2)
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LlamaAdapterV2Config(**kw))
    model.add_adapter("b", LlamaAdapterV2Config(**kw))
    model.base_model.set_adapter(["default", "b"])
    model.eval()
    ids = token_ids()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    want = logits_of(model, input_ids=ids)
    model.base_model.merge_adapter(["default", "b"])
    torch.testing.assert_close(logits_of(model, input_ids=ids), want, atol=2e-5, rtol=0)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(logits_of(model, input_ids=ids), want, atol=2e-5, rtol=0)
    state = model.state_dict()
    for key, weight in weights.items():
        torch.testing.assert_close(state[key], weight, atol=1e-5, rtol=0)
    assert not any(k.endswith("base_layer.bias") for k in state)  # the biases the merge created are gone


def test_a_layer_whose_prompts_read_the_frozen_weights_stays_unmerged_for_every_adapter():
    """Adapter 'default' has prompts reading k_proj / v_proj through their frozen weights and biases there; 'b'
    has biases there too. Merging both keeps those layers unmerged for both (folding 'b' alone would change what
    the prompts read, and skipping 'default' alone would drop it): the logits are kept."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LlamaAdapterV2Config(init_weights=False, scale_modules=[], prompt_length=3))
    model.add_adapter("b", LlamaAdapterV2Config(init_weights=False, scale_modules=[], prompt_layers=0))
    model.base_model.set_adapter(["default", "b"])
    model.eval()
    ids = token_ids()
    want = logits_of(model, input_ids=ids)
    model.base_model.merge_adapter(["default", "b"])
    k_proj = model.base_model.model.model.layers[1].self_attn.k_proj
    assert k_proj.merged_adapters == [] and model.base_model.model.model.layers[1].self_attn.q_proj.merged
    torch.testing.assert_close(logits_of(model, input_ids=ids), want, atol=2e-5, rtol=0)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(logits_of(model, input_ids=ids), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("strategy", [dict(num_beams=2), dict(num_beams=2, num_return_sequences=2)])
def test_beam_search_on_several_images_pairs_each_beam_with_its_own_image(strategy):
    """`generate` repeats each sample's visual prompts for its beams (sample-major, as transformers repeats the
    inputs): every beam of every sample scores its tokens as it does alone."""
    torch.manual_seed(3)
    model = get_peft_model(tiny_llama("gqa", "sdpa"), LlamaAdapterV2Config(init_weights=False, **V2_VISION)).eval()
    with torch.no_grad():  # gates wide open, so that the visual prompts move the logits well above rounding
        for module in model.modules():
            if isinstance(module, OutputProjection):
                for gate in module.mma_adapter_v2_gate.values():
                    gate.fill_(2.0)
    ids = token_ids(2, 6)
    ids[:, 0] = 1
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(4)) * 3
    common = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    common |= strategy
    with torch.no_grad():
        together = model.generate(input_ids=ids, pixel_values=images, **common)
        alone = [model.generate(input_ids=ids[i : i + 1], pixel_values=images[i : i + 1], **common) for i in (0, 1)]
        swapped = model.generate(input_ids=ids, pixel_values=images.flip(0), **common)
    assert torch.equal(together.sequences, torch.cat([a.sequences for a in alone]))
    for step, logits in enumerate(together.logits):
        torch.testing.assert_close(logits, torch.cat([a.logits[step] for a in alone]), atol=1e-5, rtol=0)
    assert (swapped.logits[0] - together.logits[0]).abs().max() > 1e-3  # the images count, 100 × the tolerance above
