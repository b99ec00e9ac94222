"""Behaviours both methods share, each checked on every row of a matrix, as PEFT's own `ALL_CONFIGS` tests do:
LLaMA-Adapter V2 and LaVIN, text-only and with a vision encoder (rows in conftest's `MATRIX`). Identity at init,
adapter-only checkpoints that reload bitwise, merging, cached generation on left-padded batches, the `Trainer`, and
bad input; then PEFT's conventions: low-CPU-memory loading, adapter dtype autocasting, both kinds of gradient
checkpointing, and the idempotent-merge warning."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import (
    MATRIX,
    PREFIX,
    V2_VISION,
    batch_for,
    config_for,
    greedy_without_cache,
    logits_of,
    model_for,
    tiny_llama,
    token_ids,
)
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, Trainer, TrainingArguments

from peft_mma import LaVINConfig, LlamaAdapterV2Config

ROWS = list(MATRIX)


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def text_row(row: str) -> str:
    return row.replace("image", "text")


@pytest.mark.parametrize("row", ROWS)
def test_identity_at_init(llama, row):
    """Zero-init adapters: every real token of every sample without an image gets the base model's logits; V2's
    image samples too (its prompts are gated by zero). LaVIN's one more, masked, key column (the modality token)
    rounds the eager softmax by about 1e-7."""
    reference = copy.deepcopy(llama)
    model = model_for(row, base=llama, init_weights=True).eval()
    batch = batch_for(row, model)
    samples = torch.ones(2, dtype=torch.bool)
    if row.startswith("lavin") and "has_image" in batch:
        samples = ~batch["has_image"]
    with torch.no_grad():
        expected = reference(input_ids=batch["input_ids"][samples], attention_mask=batch["attention_mask"][samples])
    mask = batch["attention_mask"][samples, :, None]
    atol = 0 if row.startswith("v2") else 1e-6
    torch.testing.assert_close(logits(model, batch)[samples] * mask, expected.logits * mask, atol=atol, rtol=0)


@pytest.mark.parametrize("row", ROWS)
def test_save_holds_only_adapter_weights_and_reload_is_bitwise(tmp_path, row):
    base = tiny_llama("gqa", "sdpa")
    base.save_pretrained(tmp_path / "base")
    model = model_for(row, base=base).eval()
    batch = batch_for(row, model)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    prefix = PREFIX[MATRIX[row][0]]
    assert tensors and all(prefix in k for k in tensors), [k for k in tensors if prefix not in k]
    assert not any("base_layer" in k for k in tensors)  # no frozen weight of the decoder or the encoder
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == model.peft_config["default"].peft_type.value and saved["base_num_layers"] == 4
    if row == "lavin-image":
        assert (saved["image_token_id"], saved["num_image_tokens"]) == (97, 2)

    def fresh():
        return LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()

    # CPU kernels can differ in the last bit between weights that require grad and frozen ones (timm's SDPA in V2's
    # bridge), so a trainable reload is compared with the trainable original and a frozen one with the frozen one.
    trainable = PeftModel.from_pretrained(fresh(), tmp_path / "adapter", is_trainable=True).eval()
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()
    assert torch.equal(logits(trainable, batch), expected)
    model.base_model.set_adapter("default", inference_mode=True)
    expected = logits(model, batch)
    reloaded = PeftModel.from_pretrained(fresh(), tmp_path / "adapter").eval()
    assert not any(p.requires_grad for p in reloaded.parameters())  # loaded for inference
    assert torch.equal(logits(reloaded, batch), expected)

    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert torch.equal(logits(auto, batch), expected)


@pytest.mark.parametrize("row", ROWS)
def test_transformers_load_adapter_works_or_refuses_clearly(tmp_path, row):
    """transformers' `load_adapter` keeps the injected LLaMA and drops PEFT's tuner. V2 text-only adapters live in
    the layers and give the PeftModel's logits; what keeps parts on the tuner refuses with a message instead of
    ignoring the images: LaVIN when loading, V2 with a visual path at its first forward."""
    model = model_for(row).eval()
    batch = batch_for(row, model)
    model.save_pretrained(tmp_path / "adapter")
    tiny_llama("gqa", "sdpa").save_pretrained(tmp_path / "base")
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    if row.startswith("lavin"):
        with pytest.raises(ValueError, match="get_peft_model"):
            plain.load_adapter(str(tmp_path / "adapter"))
        return
    plain.load_adapter(str(tmp_path / "adapter"))
    text = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    if row == "v2-text":
        assert torch.equal(logits(plain, text), logits(model, text))
    else:
        with pytest.raises(ValueError, match="visual path.*PeftModel"):
            logits(plain, text)


@pytest.mark.parametrize("row", ROWS)
def test_merge_and_unmerge_keep_the_logits_and_restore_the_base_weights(row):
    """Merging folds what can be folded into the base weights (V2: biases and scales; LaVIN: the adapters of the
    text modality) and keeps text logits; unmerging gives the base weights back; a disabled adapter is the base."""
    model = model_for(row).eval()
    batch = batch_for(text_row(row), model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    expected = logits(model, batch)
    model.base_model.merge_adapter()
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    restored = dict(model.named_parameters())
    for name, weight in frozen.items():
        torch.testing.assert_close(restored[name], weight, atol=1e-6, rtol=0, msg=name)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), logits(tiny_llama("gqa", "sdpa"), batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "row, overrides",
    [(row, {}) for row in ROWS] + [("lavin-image", dict(adapter_placement="block"))],
    ids=ROWS + ["lavin-image-block"],
)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_greedy_generate_equals_uncached_decoding_and_each_sample_alone(row, overrides, attn):
    """On a left-padded batch (mixed on the vision rows): `generate` returns prompt + new tokens, the same tokens as
    greedy decoding without a cache, and the same as each sample generated alone, with its image if it has one."""
    model = model_for(row, base=tiny_llama("gqa", attn), **overrides).eval()
    batch = batch_for(row, model, left=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    width, new = batch["input_ids"].shape[1], 6
    settings = dict(max_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**inputs, **settings)
    assert cached.shape == (2, width + new) and torch.equal(cached[:, :width], batch["input_ids"])
    assert torch.equal(cached, greedy_without_cache(model, batch, new))
    for i in range(2):
        real = batch["attention_mask"][i].bool()
        alone = {"input_ids": batch["input_ids"][i, real][None]}
        if batch.get("has_image", torch.zeros(2, dtype=torch.bool))[i]:
            alone["pixel_values"] = batch["pixel_values"][i : i + 1]
        with torch.no_grad():
            tokens = model.generate(**alone, **settings)[0]
        start = width - int(real.sum())  # left padding
        assert torch.equal(cached[i, start : start + len(tokens)], tokens), i
        assert (cached[i, start + len(tokens) :] == 0).all()  # it stopped at its EOS; the batch row is padded
    if "pixel_values" in batch:  # the image reaches the logits
        other = {**inputs, "pixel_values": torch.randn_like(batch["pixel_values"])}
        assert (logits(model, other)[0] - logits(model, inputs)[0]).abs().max() > 1e-4


@pytest.mark.parametrize("row", ROWS)
def test_a_left_padded_row_gives_the_logits_it_gives_alone(row):
    """A forward without `position_ids` counts each row's positions from its first unmasked token, as `generate`
    does: V2's position-free prompts are read by rotated queries, so positions from the padded start would change a
    left-padded row's logits."""
    model = model_for(row).eval()
    with torch.no_grad():
        for gate in (p for n, p in model.named_parameters() if "_gate." in n):  # prompts that count
            gate.normal_(0, 1.0)
    batch = batch_for(row, model, left=True)
    full = logits(model, batch)
    for i in range(2):
        real = batch["attention_mask"][i].bool()
        alone = {"input_ids": batch["input_ids"][i, real][None]}
        if "pixel_values" in batch:
            alone["pixel_values"] = batch["pixel_values"][i : i + 1]
            if "has_image" in batch:
                alone["has_image"] = batch["has_image"][i : i + 1]
        torch.testing.assert_close(full[i, real], logits(model, alone)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("row", ROWS)
def test_flash_attention_kernel_is_picked_by_its_own_name(monkeypatch, row):
    """Flash attention chooses its kernel from the attention module's config; through our wrapper it must still read
    `flash_attention_2` (a kernel named `flash_attention_2+mma` does not exist). flash-attn needs a GPU, so a stand-in
    kernel (causal, padding from the 2-D mask, as flash attention computes it) records the name it is asked for;
    logits and cached greedy tokens equal those of the same adapters on sdpa."""
    import transformers.integrations.flash_attention as flash

    asked = []

    def kernel(query, key, value, attention_mask, query_length, is_causal, softmax_scale=None, **kwargs):
        asked.append(kwargs["attn_implementation"])
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, T, d)
        allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -k.shape[2] :].bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=softmax_scale, enable_gqa=True)
        return out.transpose(1, 2)

    monkeypatch.setattr(flash, "_flash_attention_forward", kernel)
    plain = tiny_llama("gqa", "sdpa")
    plain.config._attn_implementation = "flash_attention_2"  # `set_attn_implementation` refuses it without flash-attn
    try:
        with torch.no_grad():
            plain(input_ids=torch.ones(1, 3, dtype=torch.long))
    except AttributeError as error:  # transformers 5.6: `s_aux.to(...)` on models without attention sinks
        pytest.skip(f"transformers {transformers.__version__}'s flash attention fails on a plain LLaMA: {error}")
    asked.clear()
    sdpa = model_for(row, base=tiny_llama("gqa", "sdpa")).eval()
    batch = batch_for(row, sdpa, left=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    base = tiny_llama("gqa", "sdpa")
    base.config._attn_implementation = "flash_attention_2"  # `set_attn_implementation` refuses it without flash-attn
    model = model_for(row, base=base).eval()
    assert model.config._attn_implementation == "flash_attention_2+mma"
    torch.testing.assert_close(logits(model, batch), logits(sdpa, batch), atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, **settings), sdpa.generate(**inputs, **settings))
    assert asked and set(asked) == {"flash_attention_2"}


@pytest.mark.parametrize("row", ROWS)
def test_trainer_trains_every_adapter_parameter_and_nothing_else(tmp_path, row):
    """Three `Trainer` steps from zero-init adapters on a batch (mixed on the vision rows) move every trainable
    parameter, and only those; the frozen encoder stays frozen."""
    model = model_for(row, init_weights=True)
    batch = batch_for(row, model)
    samples = [{k: v[i] for k, v in batch.items()} for i in range(2)] * 2
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        report_to=[], save_strategy="no", remove_unused_columns=False, use_cpu=True,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(model=model, args=args, train_dataset=samples).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable, (trainable - changed, changed - trainable)
    assert all(PREFIX[MATRIX[row][0]] in n for n in trainable)


@pytest.mark.parametrize("row", ["v2-image", "lavin-image"])
@pytest.mark.parametrize(
    "pixels, match",
    [
        (torch.randn(2, 3, 32, 32), r"shape \(batch, 3, 28, 28\)"),
        (torch.randn(3, 28, 28), r"shape \(batch, 3, 28, 28\)"),
        (torch.zeros(2, 3, 28, 28, dtype=torch.uint8), "floating-point tensor"),
        (torch.randn(3, 3, 28, 28), "`pixel_values` holds 3 images for a batch of 2 sequences"),
    ],
)
def test_bad_pixel_values_are_refused_by_forward_and_generate(row, pixels, match):
    model = model_for(row).eval()
    ids = batch_for(row, model)["input_ids"]
    with pytest.raises(ValueError, match=match):
        model(input_ids=ids, pixel_values=pixels)
    with pytest.raises(ValueError, match=match):
        model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=2)


@pytest.mark.parametrize("row", ROWS)
def test_a_model_of_another_family_is_refused_and_left_untouched(row):
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(TypeError, match=r"LLaMA-architecture decoders .*got GPT2LMHeadModel with model_type='gpt2'"):
        get_peft_model(model, config_for(row))
    assert [n for n, _ in model.named_modules()] == names
    assert not model.config._attn_implementation.endswith("+mma")


@pytest.mark.parametrize("row", ROWS)
def test_low_cpu_mem_usage_loading_gives_the_same_model(tmp_path, row):
    model = model_for(row).eval()
    batch = batch_for(row, model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama("gqa", "sdpa"), tmp_path, low_cpu_mem_usage=True).eval()
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    for name, parameter in model.named_parameters():  # the same weights, bit for bit
        assert torch.equal(parameter, loaded.get_parameter(name)), name
    # The logits agree to rounding only: accelerate (1.16) may leave a loaded weight as a view of the file's buffer,
    # aligned to 8 bytes rather than 64, and the CPU's matmul then takes another kernel (seen: 4e-8 on V2's bridge).
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("row", ROWS)
def test_adapter_dtype_follows_autocast_adapter_dtype(row, autocast):
    """On a bf16 base, adapter weights are fp32 by default and bf16 with `autocast_adapter_dtype=False`, as PEFT's
    own methods; frozen weights (base and encoder) stay bf16; the model runs either way."""
    model = model_for(row, tiny_llama("gqa", "sdpa").to(torch.bfloat16), autocast_adapter_dtype=autocast)
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32 if autocast else torch.bfloat16} and frozen == {torch.bfloat16}
    batch = batch_for(row, model)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("row", ROWS)
def test_bf16_autocast_trains_an_fp32_model_as_its_linears_would(row):
    """Mixed precision, as `Trainer(bf16=True)` runs an fp32 model: under `torch.autocast` the adapters' nodes compute
    in bf16 like the base's linears (their outputs are bf16), backward runs, every trainable parameter gets an fp32
    gradient, and loss and gradients agree with the fp32 ones to bf16's precision. (The gradient is compared whole:
    a parameter whose gradient is a millionth of the largest, V2's scale of a query, differs by up to 12 % in bf16,
    as much through autograd's own ops as through our nodes.)"""
    reference = model_for(row).train()
    batch = batch_for(row, reference)
    reference(**batch).loss.backward()
    model = model_for(row).train()
    nodes = [m for n, m in model.named_modules() if n.endswith(("q_proj", "mma_lavin_down"))]
    dtypes = []
    hooks = [m.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype)) for m in nodes]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    torch.testing.assert_close(loss, reference(**batch).loss.detach(), atol=0, rtol=2e-2)
    grads, expected = [], []
    for (name, param), fp32 in zip(model.named_parameters(), reference.parameters()):
        if param.requires_grad:
            assert param.grad is not None and param.grad.dtype == torch.float32, name
            grads.append(param.grad.flatten())
            expected.append(fp32.grad.flatten())
    grads, expected = torch.cat(grads), torch.cat(expected)
    assert (grads - expected).norm() / expected.norm() < 2e-2


@pytest.mark.parametrize("row", ROWS)
def test_cached_generate_under_bf16_autocast_follows_fp32(row):
    """`generate` under bf16 autocast (prefill and cached decoding steps: V2's prompt keys and values, LaVIN's kept
    routing and mixed up-paths) picks fp32's greedy tokens on this batch, each step's scores within 2e-2 of fp32's
    (relative norm; measured 0.004-0.006)."""
    model = model_for(row).eval()
    batch = batch_for(row, model, left=True, seed=1)
    batch.pop("labels")
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = model.generate(**batch, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.generate(**batch, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for scores, fp32 in zip(got.scores, expected.scores, strict=True):
        assert (scores.float() - fp32).norm() / fp32.norm() < 2e-2


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("row", ROWS)
def test_gradient_checkpointing_reaches_every_trainable_parameter(row, reentrant):
    """Reentrant and non-reentrant checkpointing: every trainable parameter gets a gradient, equal to the one
    without checkpointing."""
    plain = model_for(row).train()
    batch = batch_for(row, plain)
    plain(**batch).loss.backward()
    expected = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    model = model_for(row).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on use_reentrant
        model(**batch).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_v2_fused_into_several_layers_trains_under_non_reentrant_checkpointing_and_says_so_under_reentrant():
    """V, fused into every prompted layer (the BIAS-7B presets' `visual_fusion="all"`), comes from one bridge call:
    non-reentrant checkpointing gives the plain gradients; reentrant would run the bridge's backward once per
    layer, which torch refuses with an unclear error, so the second fused layer raises saying what to do."""
    plain = model_for("v2-image", visual_fusion="all").train()
    batch = batch_for("v2-image", plain)
    plain(**batch).loss.backward()
    expected = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for reentrant in (False, True):
        model = model_for("v2-image", visual_fusion="all").train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            with pytest.raises(ValueError, match=r"several layers, and reentrant gradient checkpointing .*'use_reen"):
                model(**batch)
            continue
        model(**batch).loss.backward()
        for name, param in model.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("row", ["v2-text", "lavin-text", "lavin-image"])
def test_a_second_merge_warns_and_changes_nothing(row):
    model = model_for(row, prompt_layers=0) if row == "v2-text" else model_for(row)
    model.eval().base_model.merge_adapter()
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.base_model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, merged, atol=0, rtol=0)


@pytest.mark.parametrize("row", ROWS)
def test_safe_merge_refuses_nan_adapters_with_peft_s_message(row):
    """PEFT's `_test_merge_layers_nan`: a broken adapter is refused with PEFT's words, the base left unmerged."""
    model = model_for(row).eval()
    base_weights = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.fill_(float("nan"))
    message = "NaNs detected in the merged weights. The adapter default seems to be broken"  # PEFT's own
    with pytest.raises(ValueError, match=message):
        model.base_model.merge_adapter(safe_merge=True)
    assert all(torch.equal(p, base_weights[n]) for n, p in model.named_parameters() if n in base_weights)


@pytest.mark.parametrize("row", ROWS)
def test_a_config_object_filled_in_for_one_base_is_refused_by_another_with_a_clear_message(tmp_path, row):
    """PEFT keeps the caller's config object in the model and injection fills in what it derives from the base
    (depth, width, LaVIN's image token id), so one object cannot serve two bases: reusing it on another base says
    so, instead of claiming the adapter was trained for it; the same base takes it again, and a copy of an unused
    config serves another base."""
    config = config_for(row)
    fresh = copy.deepcopy(config)
    get_peft_model(tiny_llama("gqa", "sdpa"), config)
    get_peft_model(tiny_llama("gqa", "sdpa"), config)  # the same base
    with pytest.raises(ValueError, match="filled in for a base with 4 layers .* by an earlier `get_peft_model`"):
        get_peft_model(tiny_llama("gqa", "sdpa", num_hidden_layers=6), config)
    if row.startswith("lavin"):  # same depth, another vocabulary: the filled id would be a text token there
        with pytest.raises(ValueError, match="image token id 97 by an earlier `get_peft_model`"):
            get_peft_model(tiny_llama("gqa", "sdpa", vocab_size=120), config)
    other = get_peft_model(tiny_llama("gqa", "sdpa", num_hidden_layers=6, vocab_size=120), fresh)
    assert other.peft_config["default"].base_num_layers == 6
    assert logits_of(other, input_ids=token_ids()).shape[-1] == 120
    other.peft_config["default"].save_pretrained(tmp_path)
    loaded = type(config).from_pretrained(tmp_path)  # its base size read from a file: made for that base
    with pytest.raises(ValueError, match="This adapter was made for a base with 6 layers"):
        get_peft_model(tiny_llama("gqa", "sdpa"), loaded)


@pytest.mark.parametrize("row", ["v2-image", "lavin-image"])
def test_a_config_field_json_cannot_hold_is_refused_when_the_config_is_made(row):
    """`adapter_config.json` must hold every field: a class in `vision_model_kwargs` is refused at once, not by
    `save_pretrained` after training (which left an empty adapter_config.json)."""
    kwargs = dict(MATRIX[row][1]["vision_model_kwargs"], act_layer=torch.nn.GELU)
    with pytest.raises(ValueError, match="`vision_model_kwargs`=.*cannot be saved in adapter_config.json"):
        config_for(row, vision_model_kwargs=kwargs)


@pytest.mark.parametrize("row", ROWS)
def test_deleting_every_adapter_leaves_the_base_model(row):
    """PEFT's `_test_delete_adapter`: a second adapter and the first deleted; the base model then runs as it was."""
    base = tiny_llama("gqa", "sdpa")
    ids = token_ids()
    expected = logits_of(base, input_ids=ids)
    model = model_for(row, base=base)
    model.add_adapter("other", config_for(row))
    for name in ("other", "default"):
        model.delete_adapter(name)
        assert name not in model.peft_config
    assert model.active_adapters == [] and not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(logits_of(model.base_model, input_ids=ids), expected, atol=0, rtol=0)


@pytest.mark.parametrize("row", ROWS)
def test_deleting_the_active_adapter_makes_the_next_one_trainable_as_set_adapter_does(row):
    """PEFT's layers make the adapter that takes the deleted active one's place trainable; the model-level parts
    (visual bridge, projector, modality embedding, encoder adapters) follow, as after `set_adapter`."""
    model = model_for(row)
    model.add_adapter("other", config_for(row))
    model.set_adapter("other")
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".other" in n for n in expected)
    model.set_adapter("default")
    model.delete_adapter("default")
    assert model.active_adapters == ["other"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


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
    model = model_for(row).eval()
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
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, filename, **kw: None)
    with torch.device("meta"):  # a skeleton (counting, conversion) reads no weights, cached or not
        skeleton = get_peft_model(
            LlamaForCausalLM(tiny_llama().config), config(vision_model=name, vision_model_kwargs=kwargs)
        )
    assert all(p.device.type == "meta" for p in skeleton.parameters())


@pytest.mark.parametrize("row", ["v2-text", "lavin-text"])
def test_switching_the_attention_implementation_after_attaching_keeps_the_adapter(row):
    """`set_attn_implementation` after `get_peft_model` replaces the wrapper that V2's prompts and LaVIN's
    modality token live in; the next call wraps the new implementation again, with the same logits."""
    model = model_for(row, base=tiny_llama("gqa", "eager")).eval()
    batch = batch_for(row, model)
    with torch.no_grad():
        want = model(**batch).logits
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            got = model(**batch).logits
        assert model.base_model.model.config._attn_implementation == implementation + "+mma"
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("row", ["v2-image", "lavin-image"])
def test_adding_or_loading_an_adapter_leaves_the_trainability_of_the_others(tmp_path, row):
    """PEFT's `inject_adapter` restores the layers' `requires_grad` after its `set_adapter`; the tuner-level parts
    (visual bridge, projector, modality embedding) get the same: loading another adapter for evaluation does not
    freeze the one being trained, and adding one does not unfreeze an adapter the user froze."""
    model_for(row).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama("gqa"), tmp_path, is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".default" in n and ("_visual." in n or "_proj_in." in n) for n in trainable)
    model.load_adapter(tmp_path, adapter_name="other")  # is_trainable=False
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    model.set_requires_grad("default", False)
    model.add_adapter("third", config_for(row))
    assert not any(p.requires_grad for p in model.parameters())
    # a partial choice is kept too: one layer's and one model-level tensor of the adapter frozen, the rest trained
    model.set_requires_grad("default", True)
    frozen = [n for n in trainable if ".layers.1." in n][:2] + [n for n in trainable if ".layers." not in n][:1]
    assert len(frozen) == 3
    for name, param in model.named_parameters():
        param.requires_grad_(param.requires_grad and name not in frozen)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    model.add_adapter("fourth", config_for(row))
    assert {n: p.requires_grad for n, p in model.named_parameters() if n in before} == before


@pytest.mark.parametrize("row", ["v2-text", "lavin-text"])
def test_an_unknown_adapter_name_is_refused_and_changes_nothing(row):
    model = model_for(row).eval()
    batch = batch_for(row, model)
    expected = logits(model, batch)
    calls = {
        "merge_adapter": lambda: model.merge_adapter(["nope"]),
        "merge_adapter, a known name first": lambda: model.merge_adapter(["default", "nope"]),
        "merge_and_unload": lambda: model.merge_and_unload(adapter_names=["nope"]),
        "set_adapter": lambda: model.base_model.set_adapter("nope"),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=r"Adapter 'nope' does not exist; the adapters are \['default'\]"):
            call()
        assert model.active_adapters == ["default"]
        assert not any(getattr(module, "merged_adapters", None) for module in model.modules())
        torch.testing.assert_close(logits(model, batch), expected, atol=0, rtol=0)


@pytest.mark.parametrize("row", ["v2-text", "lavin-text"])
def test_merging_the_active_adapter_skips_layers_only_another_adapter_holds(row):
    """The second adapter wraps modules the active one leaves alone (V2: the norms, which the first does not tune;
    LaVIN placement 'block': the MLPs): merging the active one folds it where it is, and the logits stay."""
    v2 = row.startswith("v2")
    model = model_for(row, **(dict(norm_modules=[], prompt_layers=0) if v2 else {})).eval()
    torch.manual_seed(5)
    model.add_adapter("other", config_for(row, **(dict(prompt_layers=0) if v2 else dict(adapter_placement="block"))))
    batch = {k: v for k, v in batch_for(row, model).items() if k != "labels"}
    expected = logits(model, batch)
    modality = {} if v2 else {"modality": "text"}
    merged = copy.deepcopy(model)
    merged.merge_adapter(**modality)
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)
    plain = copy.deepcopy(model).merge_and_unload(**modality)
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("row", ["v2-text", "lavin-text"])
def test_a_whole_model_saved_with_torch_save_runs_in_a_new_process(tmp_path, row):
    """The config names the wrapped attention (`sdpa+mma`), which a new process registers when the model runs."""
    model = model_for(row).eval()
    batch = {k: v for k, v in batch_for(row, model).items() if k != "labels"}
    torch.save((model, batch, logits(model, batch)), tmp_path / "whole.pt")
    script = (
        "import sys, torch; model, batch, expected = torch.load(sys.argv[1], weights_only=False)\n"
        "with torch.no_grad(): print(float((model(**batch).logits - expected).abs().max()))"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "whole.pt")], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split()[-1]) < 1e-6  # the new process may sum on another number of threads (seen: 1.5e-8)


@pytest.mark.parametrize("row", ROWS)
def test_low_cpu_mem_usage_loading_onto_a_bf16_base_keeps_the_fp32_adapter_weights(tmp_path, row):
    """PEFT moves adapters to their base layer's device and dtype after loading their values under
    `low_cpu_mem_usage`; ours move between devices only, so a bf16 base does not round the fp32 weights."""
    model = model_for(row)
    model.save_pretrained(tmp_path)
    base = tiny_llama("gqa", "sdpa").to(torch.bfloat16)
    loaded = PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=True)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert torch.equal(loaded.get_parameter(name), parameter), name
