"""LaVIN on the real SmolLM2-135M-Instruct (LLaMA architecture, grouped-query attention)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_VIT
from peft import get_peft_model

from peft_mma import LaVINConfig


@pytest.mark.smollm2
def test_smollm2_identity_images_generate_and_merge(smollm2):
    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]  # the session fixture is shared: adapt a copy
    ids = tokenizer(["A cat sits on", "The sky is"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        base = model(**ids).logits
    config = LaVINConfig(
        vision_model="vit_large_patch14_clip_224.openai",
        vision_pretrained=False,
        vision_model_kwargs=TINY_VIT,
        vision_feature_every=2,
    )
    peft_model = get_peft_model(model, config).eval()
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**ids).logits, base, atol=1e-4, rtol=0)  # identity at init
        out = peft_model.generate(
            **ids, pixel_values=pixels, has_image=torch.tensor([True, False]), max_new_tokens=3, do_sample=False
        )
        assert out.shape == (2, ids["input_ids"].shape[1] + 3)
        for module in peft_model.modules():  # make the adapter non-trivial, then fold it
            if hasattr(module, "mma_lavin_up0") and "default" in module.mma_lavin_up0:
                torch.nn.init.normal_(module.mma_lavin_up0["default"].weight, std=0.05)
        before = peft_model(**ids).logits
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(**ids).logits, before, atol=1e-3, rtol=0)
