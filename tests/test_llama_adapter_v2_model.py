"""LLaMA-Adapter V2 through PEFT: identity at init, save/load, merging, several adapters, generate, counts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CLIP_VIT_L14, TINY_VIT, tiny_llama
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from peft_mma import LlamaAdapterV2Config
from peft_mma.llama_adapter_v2.layer import OutputProjection

VISION = dict(
    vision_model=CLIP_VIT_L14,
    vision_pretrained=False,
    vision_model_kwargs=dict(TINY_VIT, depth=2),
    visual_width=16,
    visual_depth=1,
    visual_heads=2,
    prompt_length=3,
)


def ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs).logits


def test_identity_at_init(llama):
    x = ids()
    expected = logits(llama, input_ids=x)
    model = get_peft_model(llama, LlamaAdapterV2Config())
    torch.testing.assert_close(logits(model, input_ids=x), expected, atol=0, rtol=0)


def test_identity_at_init_with_images():
    base = tiny_llama("gqa", "sdpa")
    x, images = ids(), torch.randn(2, 3, 28, 28)
    expected = logits(base, input_ids=x)
    model = get_peft_model(base, LlamaAdapterV2Config(**VISION))
    torch.testing.assert_close(logits(model, input_ids=x, pixel_values=images), expected, atol=0, rtol=0)


def test_trained_adapter_changes_only_adapter_parameters():
    base = tiny_llama("gqa", "sdpa")
    model = get_peft_model(base, LlamaAdapterV2Config(**VISION, lora_modules=["q_proj", "v_proj"], r=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids(4, 9)
    for _ in range(3):
        loss = model(input_ids=x, labels=x, pixel_values=torch.randn(4, 3, 28, 28)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all("mma_adapter_v2_" in n for n in trainable)
    assert not any("backbone" in n for n in trainable)
    # every trainable group moved: bias, scale, norm, prompt, gate, LoRA B, the visual bridge
    for role in ("_bias.", "_scale.", "_norm.", "_prompt.", "_gate.", "_lora_B.", "_visual."):
        assert any(role in n for n in changed), role


def test_save_writes_only_adapter_weights_and_reload_is_bitwise(tmp_path):
    base = tiny_llama("odd_head_dim", "eager")
    base.save_pretrained(tmp_path / "base")
    config = LlamaAdapterV2Config(**VISION, init_weights=False, lora_modules=["k_proj"], r=2)
    model = get_peft_model(base, config).eval()
    x, images = ids(), torch.randn(2, 3, 28, 28)
    expected = logits(model, input_ids=x, pixel_values=images)
    model.save_pretrained(tmp_path / "adapter")

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all("mma_adapter_v2_" in k for k in tensors), [k for k in tensors if "mma_adapter_v2_" not in k]
    assert not any("backbone" in k or "base_layer" in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MMA_ADAPTER_V2" and saved["base_num_layers"] == 4

    def fresh():
        return LlamaForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()

    # CPU kernels can differ in the last bit between weights that require grad and frozen ones (timm's SDPA in the
    # bridge), so a trainable reload is compared with the trainable original and a frozen one with the frozen one.
    trainable = PeftModel.from_pretrained(fresh(), tmp_path / "adapter", is_trainable=True).eval()
    assert torch.equal(logits(trainable, input_ids=x, pixel_values=images), expected)
    model.base_model.set_adapter("default", inference_mode=True)
    expected = logits(model, input_ids=x, pixel_values=images)
    reloaded = PeftModel.from_pretrained(fresh(), tmp_path / "adapter").eval()
    assert torch.equal(logits(reloaded, input_ids=x, pixel_values=images), expected)

    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", attn_implementation="eager").eval()
    assert torch.equal(logits(auto, input_ids=x, pixel_values=images), expected)


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
def test_merge_and_unmerge_keep_logits(options):
    base = tiny_llama("gqa", "eager")
    model = get_peft_model(base, LlamaAdapterV2Config(init_weights=False, **options))
    x = ids()
    expected = logits(model, input_ids=x)
    model.base_model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids=x), expected, atol=1e-5, rtol=0)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(logits(model, input_ids=x), expected, atol=1e-5, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids=x), logits(tiny_llama("gqa", "eager"), input_ids=x))


def test_merge_and_unload_gives_a_plain_llama_that_vanilla_transformers_reloads(tmp_path):
    model = get_peft_model(tiny_llama("mha", "sdpa"), LlamaAdapterV2Config(prompt_layers=0, init_weights=False))
    x = ids()
    expected = logits(model, input_ids=x)
    merged = model.merge_and_unload()
    assert type(merged) is LlamaForCausalLM and merged.config._attn_implementation == "sdpa"
    assert merged.config.attention_bias and merged.config.mlp_bias
    torch.testing.assert_close(logits(merged, input_ids=x), expected, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, input_ids=x), expected, atol=1e-5, rtol=0)


def test_merge_and_unload_refuses_prompts_and_leaves_the_model_unchanged():
    model = get_peft_model(tiny_llama(), LlamaAdapterV2Config(init_weights=False))
    x = ids()
    expected = logits(model, input_ids=x)
    with pytest.raises(ValueError, match="adaption prompts, which cannot be merged"):
        model.merge_and_unload()
    assert torch.equal(logits(model, input_ids=x), expected)


def test_several_adapters_set_disable_delete():
    base = tiny_llama("gqa", "sdpa")
    x = ids()
    plain = logits(base, input_ids=x)
    model = get_peft_model(base, LlamaAdapterV2Config(init_weights=False))
    first = logits(model, input_ids=x)
    model.add_adapter("other", LlamaAdapterV2Config(init_weights=False, scale_side="input", prompt_layers=2))
    assert torch.equal(logits(model, input_ids=x), first)  # adding does not activate
    model.set_adapter("other")
    second = logits(model, input_ids=x)
    assert not torch.allclose(second, first)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".default" in n)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids=x), plain, atol=1e-6, rtol=0)
    model.set_adapter("default")
    assert torch.equal(logits(model, input_ids=x), first)
    model.delete_adapter("other")
    assert not any(".other" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model, input_ids=x), first)


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


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_generate_with_cache_equals_without(attn):
    model = get_peft_model(tiny_llama("gqa", attn), LlamaAdapterV2Config(**VISION, init_weights=False)).eval()
    x, images = ids(2, 5), torch.randn(2, 3, 28, 28)
    cached = generate(model, x, pixel_values=images, use_cache=True)
    uncached = generate(model, x, pixel_values=images, use_cache=False)
    assert torch.equal(cached, uncached)
    other = torch.randn(2, 3, 28, 28)
    assert not torch.allclose(
        logits(model, input_ids=x, pixel_values=images), logits(model, input_ids=x, pixel_values=other)
    )


def test_batched_left_padded_generate_equals_one_by_one():
    model = get_peft_model(tiny_llama("mha", "sdpa"), LlamaAdapterV2Config(**VISION, init_weights=False)).eval()
    short, long = ids(1, 4, seed=2), ids(1, 7, seed=3)
    images = torch.randn(2, 3, 28, 28)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.cat(
        [torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(short)], 1), torch.ones_like(long)]
    )
    together = generate(model, batch, mask, pixel_values=images)
    assert torch.equal(together[0, 3:], generate(model, short, pixel_values=images[:1])[0])
    assert torch.equal(together[1], generate(model, long, pixel_values=images[1:])[0])


def test_prompt_key_values_are_projected_once_per_generate_call(monkeypatch):
    model = get_peft_model(tiny_llama(), LlamaAdapterV2Config(**VISION, init_weights=False)).eval()
    calls = []
    original = OutputProjection._project
    monkeypatch.setattr(OutputProjection, "_project", lambda self, *a: calls.append(1) or original(self, *a))
    generate(model, ids(2, 5), pixel_values=torch.randn(2, 3, 28, 28))
    prompted_layers = 3  # 4 layers, all but the first; k_p and v_p each once
    assert len(calls) == 2 * prompted_layers


def test_text_only_batch_mixing_images_uses_has_image():
    model = get_peft_model(tiny_llama(), LlamaAdapterV2Config(**VISION, init_weights=False)).eval()
    x, images = ids(2, 6), torch.randn(2, 3, 28, 28)
    mixed = logits(model, input_ids=x, pixel_values=images, has_image=torch.tensor([True, False]))
    torch.testing.assert_close(mixed[0], logits(model, input_ids=x[:1], pixel_values=images[:1])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], logits(model, input_ids=x[1:])[0], atol=1e-5, rtol=0)


def test_zero_image_for_text_equals_passing_a_zero_image():
    config = LlamaAdapterV2Config(**VISION, init_weights=False, zero_image_for_text=True)
    model = get_peft_model(tiny_llama(), config).eval()
    x = ids(2, 6)
    torch.testing.assert_close(
        logits(model, input_ids=x),
        logits(model, input_ids=x, pixel_values=torch.zeros(2, 3, 28, 28)),
        atol=1e-6,
        rtol=0,
    )


def test_trainer_updates_the_adapter(tmp_path):
    model = get_peft_model(tiny_llama("gqa", "sdpa"), LlamaAdapterV2Config(**VISION))
    x = ids(8, 8)
    rows = [{"input_ids": x[i], "labels": x[i], "pixel_values": torch.randn(3, 28, 28)} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", remove_unused_columns=False, use_cpu=True,
    )  # fmt: skip
    gate = model.base_model.model.model.layers[3].self_attn.o_proj.mma_adapter_v2_gate["default"]
    before = gate.detach().clone()
    Trainer(model=model, args=args, train_dataset=rows).train()
    assert not torch.equal(gate.detach(), before)


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
