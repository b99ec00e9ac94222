"""Integration on the real SmolLM2-135M-Instruct checkpoint (LLaMA architecture, grouped-query attention)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import train_steps
from peft import PeftModel, get_peft_model

from peft_mma import LlamaAdapterV2Config

pytestmark = pytest.mark.smollm2


def batch(tokenizer):
    texts = ["The capital of France is Paris.", "Two plus two equals four, said the teacher."]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return dict(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], labels=labels)


def test_adapter_v2_on_smollm2_identity_training_reload_generate(smollm2, tmp_path):
    original, tokenizer = smollm2
    base = copy.deepcopy(original)
    assert base.config.num_key_value_heads < base.config.num_attention_heads  # grouped-query attention
    inputs = batch(tokenizer)
    with torch.no_grad():
        base_logits = base(**inputs).logits
    torch.manual_seed(0)  # the prompts' N(0, 1) init
    model = get_peft_model(base, LlamaAdapterV2Config(prompt_layers=8))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base_logits, atol=0, rtol=0)

    # lr 1e-3: the loss falls every step (3.80 → 1.39 here); 5e-3 overshoots and climbs back for some prompt inits
    losses = train_steps(model, inputs, 6, lr=1e-3)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.6 * losses[0], losses

    model.eval()
    with torch.no_grad():
        trained = model(**inputs).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path, is_trainable=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, trained)

    prompt = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        cached = model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape[1] == prompt["input_ids"].shape[1] + 5


def test_the_cached_folder_is_the_gguf_checkpoint_and_adapters_reload_with_auto_peft_model(smollm2, tmp_path):
    """The loader's Hugging Face folder holds the GGUF's weights and tokenizer; an adapter trained on it records that
    folder, so `AutoPeftModelForCausalLM` reloads it (base included) on this machine."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_mma.data.smollm2 import GGUF_NAME, cached_smollm2_dir, smollm2_dir

    model, tokenizer = smollm2
    folder = cached_smollm2_dir()
    assert model.name_or_path == str(folder)
    assert getattr(model.config, "quantization_config", None) is None  # plain weights: the Trainer trains them
    gguf = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=GGUF_NAME, dtype=torch.float32)
    gguf_state = gguf.state_dict()
    assert all(torch.equal(tensor, gguf_state[name]) for name, tensor in model.state_dict().items())
    text = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
    gguf_tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_NAME)
    assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]

    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), LlamaAdapterV2Config(prompt_layers=2, init_weights=False))
    peft_model.save_pretrained(tmp_path)
    inputs = batch(tokenizer)
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, peft_model.eval()(**inputs).logits, atol=0, rtol=0)
