"""Bad input to LLaMA-Adapter V2 gets a clear error and changes nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import logits_of, tiny_llama, token_ids
from peft import PeftModel, get_peft_model

from peft_mma import LlamaAdapterV2Config
from peft_mma.llama_adapter_v2.layer import LlamaAdapterV2Layer


def assert_untouched(model) -> None:
    assert not any(isinstance(m, LlamaAdapterV2Layer) for m in model.modules())
    assert not model.config._attn_implementation.endswith("+mma")


def test_more_prompt_layers_than_the_model_has():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"`prompt_layers`=5 exceeds the model's 4 decoder layers; pass at most 4"):
        get_peft_model(model, LlamaAdapterV2Config(prompt_layers=5))
    assert_untouched(model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scale_side="middle"), r"`scale_side`='middle'; expected one of \['output', 'input'\]"),
        (dict(bias_modules=["qkv"]), r"`bias_modules` has unknown linears \['qkv'\]"),
        (dict(prompt_length=0), r"`prompt_length`=0; expected a positive integer"),
        (dict(r=True), r"`r`=True; expected a positive integer"),
        (dict(prompt_layers=True), r"`prompt_layers`=True; expected None or an integer >= 0"),
        (dict(zero_image_for_text=True), r"`zero_image_for_text`=True needs a `vision_model`"),
        (dict(task_type="SEQ_CLS"), r"`task_type`='SEQ_CLS'; LLaMA-Adapter V2 adapts causal LMs"),
        (dict(target_modules="q_proj|v_proj"), r"takes a list of module names .* not a pattern"),
        (dict(target_modules=["qkv", "o_proj"]), r"`target_modules` has unknown modules \['qkv'\]"),
        (dict(target_modules=["q_proj"]), r"leaves out `o_proj`, where the adaption prompts and gates live"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlamaAdapterV2Config(**kwargs)


def test_a_failed_attach_leaves_the_config_as_it_was():
    """The checks fill in `base_num_layers` / `base_hidden_size` before the encoder is built; where building it
    fails, the caller's config keeps neither, so that it attaches to a base of another size once corrected."""
    config = LlamaAdapterV2Config(vision_model="no_such_vit", vision_pretrained=False)
    model = tiny_llama()
    with pytest.raises(ValueError, match="`vision_model`='no_such_vit' is neither a timm model name"):
        get_peft_model(model, config)
    assert config.base_num_layers is None and config.base_hidden_size is None
    assert_untouched(model)
    config.vision_model = None
    deeper = get_peft_model(tiny_llama(num_hidden_layers=6), config)
    assert config.base_num_layers == 6 and deeper.peft_config["default"] is config


def test_images_for_an_adapter_without_vision():
    model = get_peft_model(tiny_llama(), LlamaAdapterV2Config())
    with pytest.raises(ValueError, match="no active adapter has a visual path; set `vision_model`"):
        model(input_ids=token_ids(), pixel_values=torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("other", [dict(num_hidden_layers=6), dict(hidden_size=48)], ids=["depth", "width"])
def test_adapter_loaded_onto_another_base_is_refused(tmp_path, other):
    get_peft_model(tiny_llama(), LlamaAdapterV2Config()).save_pretrained(tmp_path)
    wrong = tiny_llama(**other)
    expected = logits_of(wrong, input_ids=token_ids())
    with pytest.raises(ValueError, match=r"made for a base with 4 layers of width 32; the model has"):
        PeftModel.from_pretrained(wrong, tmp_path)
    assert_untouched(wrong)
    assert torch.equal(logits_of(wrong, input_ids=token_ids()), expected)


def test_loading_without_the_plugin_fails_with_the_type_name(tmp_path):
    """PEFT has no plugin discovery: without `import peft_mma` its loaders raise KeyError('MMA_ADAPTER_V2')."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    get_peft_model(base, LlamaAdapterV2Config()).save_pretrained(tmp_path / "adapter")
    assert "- peft_mma" in (tmp_path / "adapter" / "README.md").read_text()  # the card names the plugin
    script = f"from peft import PeftConfig\nPeftConfig.from_pretrained({str(tmp_path / 'adapter')!r})\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0 and "KeyError: 'MMA_ADAPTER_V2'" in result.stderr


def test_target_modules_restrict_the_adapted_modules():
    model = get_peft_model(tiny_llama(), LlamaAdapterV2Config(target_modules=["q_proj", "o_proj", "norm"]))
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LlamaAdapterV2Layer)}
    assert adapted == {"q_proj", "o_proj", "norm"}


def test_the_previous_names_still_work_for_one_release(tmp_path):
    with pytest.warns(FutureWarning, match="`lora_rank` is deprecated; use `r`"):
        config = LlamaAdapterV2Config(lora_modules=["q_proj"], lora_rank=4)
    assert (config.r, config.lora_rank) == (4, None)
    with pytest.warns(FutureWarning, match='`gate_activation="none"` is deprecated; use None'):
        assert LlamaAdapterV2Config(gate_activation="none").gate_activation is None
    with pytest.warns(FutureWarning, match="`LlamaAdapterV2Config.preset` is deprecated; use `from_preset`"):
        assert LlamaAdapterV2Config.preset("CHAT-65B") == LlamaAdapterV2Config.from_preset("CHAT-65B")
    model = get_peft_model(tiny_llama(), LlamaAdapterV2Config(lora_modules=["q_proj"], r=4, init_weights=False))
    model.save_pretrained(tmp_path)
    saved = tmp_path / "adapter_config.json"
    text = saved.read_text().replace('"r": 4', '"lora_rank": 4').replace('"lora_rank": null,', "")
    saved.write_text(text)  # as an adapter saved before the rename
    with pytest.warns(FutureWarning, match="`lora_rank` is deprecated"):
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].r == 4
