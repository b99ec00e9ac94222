"""Conversions that must stop, with a message that names the problem, and write nothing."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_llama
from official_checkpoints import TINY_VIT, lavin, llama_adapter_v2, parity_base
from transformers import GPT2Config

from peft_mma.convert import ConversionError, convert_lavin, convert_llama_adapter_v2

VISION = dict(vision_pretrained=False, vision_model_kwargs=TINY_VIT, visual_heads=2)


def _touch(path: str) -> None:
    open(path, "w").close()


class Payload:
    """Unpickling this calls `_touch`: a stand-in for code a malicious checkpoint would run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


def v2(tmp_path, checkpoint, base=None, **kwargs):
    base = base if base is not None else parity_base()
    return convert_llama_adapter_v2(checkpoint, base, tmp_path / "out", overrides=VISION, progress=False, **kwargs)


def test_checkpoint_that_needs_pickle_code_is_refused_and_never_run(tmp_path):
    base = parity_base()
    checkpoint = llama_adapter_v2("bias", base)
    checkpoint["extra"] = Payload(str(tmp_path / "ran"))
    torch.save(checkpoint, tmp_path / "evil.pth")
    with pytest.raises(ConversionError, match=r"needs pickle to run code \(it contains `[\w.]*_touch`\)"):
        v2(tmp_path, tmp_path / "evil.pth", base)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()


def test_unknown_keys_are_listed(tmp_path):
    base = parity_base()
    checkpoint = llama_adapter_v2("bias", base)
    for i in (0, 1):
        checkpoint["model"][f"llama.layers.{i}.attention.mystery"] = torch.zeros(3)
    with pytest.raises(
        ConversionError, match=r"Unknown checkpoint tensors \(2\):\n  llama\.layers\.\{0-1\}\.attention\.mystery"
    ):
        v2(tmp_path, checkpoint, base)
    assert not (tmp_path / "out").exists()


def test_missing_keys_are_listed_by_their_official_names(tmp_path):
    base = parity_base()
    checkpoint = llama_adapter_v2("lora", base)
    for key in ("llama.layers.2.attention.wo.bias", "llama.layers.3.attention.wo.bias", "visual_proj.bias"):
        del checkpoint["model"][key]
    message = r"Missing tensors that the LLaMA-Adapter V2 adapter \(preset LORA-BIAS-7B\) .* needs \(3\):\n"
    with pytest.raises(
        ConversionError, match=message + r"  llama\.layers\.\{2-3\}\.attention\.wo\.bias\n  visual_proj\.bias$"
    ):
        v2(tmp_path, checkpoint, base, preset="LORA-BIAS-7B")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=48), "hidden_size`: the checkpoint has 32 (from `llama.norm.weight`), the base has 48"),
        (dict(num_attention_heads=8, num_key_value_heads=8), "num_attention_heads`: the checkpoint has 4"),
        (dict(num_hidden_layers=3), "num_hidden_layers`: the checkpoint has 4 (from `llama.layers.3.*`)"),
        (dict(intermediate_size=96), "intermediate_size`: the checkpoint has 64"),
    ],
)
def test_a_base_of_another_shape_is_named(tmp_path, overrides, field):
    checkpoint = llama_adapter_v2("bias", parity_base())
    tiny_llama(**overrides).save_pretrained(tmp_path / "other-base")
    with pytest.raises(
        ConversionError, match=rf"does not fit the base '{tmp_path}/other-base':\n.*{re.escape(field)}"
    ):
        v2(tmp_path, checkpoint, str(tmp_path / "other-base"))
    assert not (tmp_path / "out").exists()


def test_lavin_checkpoint_onto_a_wider_base_is_named(tmp_path):
    checkpoint = lavin(parity_base())
    with pytest.raises(ConversionError, match=r"LaVIN checkpoint does not fit the base .*\n  `hidden_size`"):
        convert_lavin(checkpoint, tiny_llama(hidden_size=48), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_lavin_plain_visual_adapter_has_no_counterpart(tmp_path):
    checkpoint = lavin(parity_base())
    state = checkpoint["model"]
    for key in [k for k in state if k.startswith("module.backbone.") and (".conv_D." in k or ".expert_" in k)]:
        del state[key]
    with pytest.raises(ConversionError, match=r"plain `RepAdapter` \(`visual_adapter_type='normal'`\)"):
        convert_lavin(checkpoint, parity_base(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_lavin_visual_mlp_adapters_have_no_counterpart(tmp_path):
    checkpoint = lavin(parity_base())
    state = checkpoint["model"]
    state |= {k.replace("adapter_attn", "adapter_mlp"): v for k, v in state.items() if ".resblocks.0." in k}
    with pytest.raises(ConversionError, match=r"`visual_adapter_type='router_block'`\); .* no counterpart"):
        convert_lavin(checkpoint, parity_base(), tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c["config"].update(w_lora=True), r"config says w_lora=True, but it has no LoRA tensors"),
        (lambda c: c["model"].update(x=[1, 2]), r"entries that are not tensors: \['x'\]"),
    ],
)
def test_inconsistent_checkpoints(tmp_path, change, match):
    checkpoint = llama_adapter_v2("bias", parity_base())
    change(checkpoint)
    with pytest.raises(ConversionError, match=match):
        v2(tmp_path, checkpoint)


def test_input_side_scales_cannot_become_output_side(tmp_path):
    base = parity_base()
    with pytest.raises(ConversionError, match=r"`scale_side`='output' cannot represent them exactly"):
        convert_llama_adapter_v2(
            llama_adapter_v2("chat", base), base, tmp_path / "out", overrides=dict(scale_side="output")
        )


def test_non_llama_base_and_missing_directory(tmp_path):
    GPT2Config().save_pretrained(tmp_path / "gpt2")
    checkpoint = llama_adapter_v2("bias", parity_base())
    with pytest.raises(ConversionError, match=r"model_type='gpt2'; .* convert onto a LLaMA"):
        v2(tmp_path, checkpoint, str(tmp_path / "gpt2"))
    with pytest.raises(ConversionError, match=r"is not a Hugging Face model directory"):
        v2(tmp_path, checkpoint, str(tmp_path / "nowhere"))


def test_existing_adapter_is_kept_unless_overwrite(tmp_path):
    base = parity_base()
    checkpoint = llama_adapter_v2("bias", base)
    v2(tmp_path, checkpoint, base)
    before = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ConversionError, match=r"already holds an adapter; pass `overwrite=True`"):
        v2(tmp_path, llama_adapter_v2("bias", base, seed=5), base)
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == before
    v2(tmp_path, llama_adapter_v2("bias", base, seed=5), base, overwrite=True)
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind


def test_frozen_weights_of_a_full_state_dict_are_left_out_and_counted(tmp_path):
    base = parity_base()
    checkpoint = llama_adapter_v2("bias", base)
    frozen = {"clip.visual.conv1.weight": torch.zeros(2), "llama.tok_embeddings.weight": torch.zeros(2)}
    frozen |= {f"llama.layers.{i}.attention.wk.weight": torch.zeros(2) for i in range(4)}
    checkpoint["model"] |= frozen
    summary = v2(tmp_path, checkpoint, base)
    assert summary.frozen_skipped == len(frozen) and summary.tensors_read == len(checkpoint["model"]) - len(frozen)
    assert "frozen tensors left out:      6" in str(summary)


def test_an_out_that_is_a_file_and_a_prompt_length_that_is_no_integer_are_refused(tmp_path):
    base = parity_base()
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ConversionError, match="'.*out' is a file; `out` \\(--out\\) names the adapter folder"):
        v2(tmp_path, llama_adapter_v2("bias", base), base)
    assert (tmp_path / "out").read_text() == "a file"
    checkpoint = llama_adapter_v2("chat", base, chat_prompts=True)
    for bad in ("three", 0, True):
        with pytest.raises(ConversionError, match=f"`prompt_length` must be a positive integer; got {bad!r}"):
            convert_llama_adapter_v2(checkpoint, base, tmp_path / "chat", overrides={"prompt_length": bad})
    assert not (tmp_path / "chat").exists()
