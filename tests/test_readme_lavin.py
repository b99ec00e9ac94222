"""The README's "LaVIN / MMA" snippet runs as written (on the tiny models it builds) and does what it says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from conftest import CLIP_VIT_L14, greedy_without_cache
from transformers import LlamaForCausalLM

from peft_mma import LaVINConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def lavin_snippets() -> list[str]:
    """The ```python blocks of the README section "## LaVIN / MMA"."""
    text = README.read_text(encoding="utf-8")
    assert "\n## LaVIN / MMA\n" in text
    section = text.split("\n## LaVIN / MMA\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_lavin_snippet_runs_and_does_what_it_says(tmp_path, monkeypatch):
    (snippet,) = lavin_snippets()
    monkeypatch.chdir(tmp_path)  # it writes tiny-llama/, lavin-adapter/ and lavin-merged/ where it runs
    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)  # its own asserts: bitwise reload, merge to 1e-5

    model = namespace["model"]
    config = model.peft_config["default"]
    assert isinstance(config, LaVINConfig) and config.temperature == 10.0  # the lavin-7b preset
    assert config.vision_model == CLIP_VIT_L14
    ids, text = namespace["ids"], namespace["text"]
    assert ids.shape == (2, 8 + 2) and (ids[0, 1:3] == 100).all() and not (ids[1] == 100).any()
    new_ids = namespace["new_ids"]
    assert new_ids.shape == (1, 10 + 4) and torch.equal(new_ids[:, :10], ids[:1])
    prompt = {"input_ids": ids[:1], "attention_mask": torch.ones(1, 10), "pixel_values": namespace["pixel_values"][:1]}
    assert torch.equal(new_ids, greedy_without_cache(model, prompt, 4))  # the cached tokens are the uncached ones
    assert namespace["logits"].shape == (2, 10, 100)  # they line up with `input_ids`
    image_row, text_row = namespace["logits"][0, 3:], namespace["text_logits"][0, 1:]  # after BOS and the image
    assert (image_row - text_row).abs().max() > 1e-3  # the image changes sample 0 after one training step

    saved = json.loads((tmp_path / "lavin-adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MMA_LAVIN" and saved["task_type"] == "CAUSAL_LM"
    assert (saved["image_token_id"], saved["num_image_tokens"]) == (100, 2)
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "lavin-merged").eval()
    assert merged.config.attention_bias
    with torch.no_grad():
        reloaded = merged(input_ids=text).logits
    torch.testing.assert_close(reloaded, namespace["text_logits"], atol=1e-5, rtol=0)
