"""LaVIN on the real SmolLM2-135M-Instruct (LLaMA architecture, grouped-query attention)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import LAVIN_VISION, greedy_without_cache
from peft import get_peft_model

from peft_mma import LaVINConfig
from peft_mma.data import ImageTokens


@pytest.mark.smollm2
def test_smollm2_identity_images_cached_generation_and_merge(smollm2):
    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]  # the session fixture is shared: adapt a copy
    ids = tokenizer(["A cat sits on", "The sky is"], return_tensors="pt", padding=True, padding_side="left")
    assert (ids["attention_mask"][1] == 0).any()  # row 1 is left-padded
    with torch.no_grad():
        base = model(**ids).logits
    peft_model = get_peft_model(model, LaVINConfig(**LAVIN_VISION)).eval()
    real = ids["attention_mask"][..., None].bool()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**ids).logits * real, base * real, atol=1e-4, rtol=0)  # identity
        torch.manual_seed(0)
        for module in peft_model.modules():  # make the adapters non-trivial: the two routes now differ
            for path in ("mma_lavin_up0", "mma_lavin_up1"):
                if hasattr(module, path) and "default" in getattr(module, path):
                    torch.nn.init.normal_(getattr(module, path)["default"].weight, std=0.05)

        tokens = ImageTokens.from_config(peft_model.peft_config["default"])
        batch = tokens.expand(ids["input_ids"], ids["attention_mask"], has_image=torch.tensor([True, False]))
        batch["pixel_values"] = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
        assert batch["attention_mask"][1, 0] == 0 and (batch["input_ids"][0, :2] == tokens.token_id).all()
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        cached = peft_model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=pad)
        assert cached.shape == (2, batch["input_ids"].shape[1] + 6)
        assert torch.equal(cached, greedy_without_cache(peft_model, batch, 6, eos=eos, pad=pad))

        before = peft_model(**ids).logits
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(**ids).logits * real, before * real, atol=1e-3, rtol=0)
