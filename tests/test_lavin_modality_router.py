"""`LaVINConfig(router="modality")`: text-only samples use up-path B alone, samples with an image D alone.

The official router starts at w ≈ (½, ½) for both modalities, so both paths get the same updates and image tuning
changes text-only outputs as much as image ones; with the modality router neither modality trains the other's path.
"""

from __future__ import annotations

import pytest
import torch
from conftest import LAVIN_VISION, lavin_batch, tiny_llama, train_steps
from peft import PeftModel, get_peft_model

from peft_mma import LaVINConfig


def modality_lavin(seed: int = 1, **kwargs):
    """A LaVIN model with the modality router on `tiny_llama()`, no dropout, in eval mode."""
    torch.manual_seed(seed)
    config = LaVINConfig(router="modality", adapter_dropout=0.0, **LAVIN_VISION, **kwargs)
    return get_peft_model(tiny_llama(), config).eval()


def decoder_paths(model, path: int) -> list[torch.nn.Module]:
    """The up-projection `path` (0: B, 1: D) of every decoder adapter."""
    return [getattr(m, f"mma_lavin_up{path}")["default"] for m in model.base_model._llm_adapters()]


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_no_decoder_router_no_modality_token_and_the_identity_at_init():
    """The decoder's adapters have no router and the model no modality embedding (2·C + per layer 2·C + 2 fewer
    parameters than the learnt router); the encoder's adapters keep theirs. No token goes in front: the decoder sees
    the caller's S positions, and at init a text-only sample's logits are the base model's."""
    torch.manual_seed(1)
    learnt = get_peft_model(tiny_llama(), LaVINConfig(**LAVIN_VISION))
    model = modality_lavin()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("mma_lavin_modality" in n for n in names)
    assert not any("mma_lavin_router" in n and ".layers." in n for n in names)
    assert sum("mma_lavin_router" in n and ".blocks." in n for n in names) == 2 * 4  # weight and bias, 4 blocks
    width, layers = 32, 4
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    official = sum(p.numel() for p in learnt.parameters() if p.requires_grad)
    assert count == official - 2 * width - layers * (2 * width + 2)

    batch = lavin_batch(model, has_image=(True, False))
    lengths = []
    model.base_model.model.model.layers[0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    out = logits(model, batch)
    assert lengths == [batch["input_ids"].shape[1]]  # S, not 1 + S
    text = batch["input_ids"][1:, :7]  # the text-only sample, without its padding
    with torch.no_grad():
        base = tiny_llama()(input_ids=text).logits
    torch.testing.assert_close(out[1:, :7], base, atol=1e-6, rtol=0)


def test_text_only_samples_read_the_first_path_and_image_samples_the_second():
    """With random adapters, zeroing D leaves a text-only sample's logits bitwise as they were and changes the
    image sample's; zeroing B does the opposite. `modality_routing` reports (1, 0) for text and (0, 1) for images."""
    model = modality_lavin(init_weights=False)
    batch = lavin_batch(model, has_image=(True, False))
    both = logits(model, batch)
    for path, kept, changed in ((1, 1, 0), (0, 0, 1)):  # zero D: text kept; zero B: image kept
        saved = [up.weight.detach().clone() for up in decoder_paths(model, path)]
        with torch.no_grad():
            for up in decoder_paths(model, path):
                up.weight.zero_(), up.bias.zero_()
        out = logits(model, batch)
        assert torch.equal(out[kept], both[kept])
        assert (out[changed] - both[changed]).abs().max() > 1e-3
        model = modality_lavin(init_weights=False)  # fresh random adapters (same seed) for the next case
        assert torch.equal(decoder_paths(model, path)[0].weight, saved[0])
    routing = model.base_model.modality_routing()
    assert len(routing) == 4
    assert all(torch.equal(w, torch.tensor([[1.0, 0.0], [0.0, 1.0]])) for w in routing.values())


@pytest.mark.parametrize("tuned", ["image", "text"])
def test_tuning_on_one_modality_leaves_the_other_modalitys_path_and_outputs_unchanged(tuned):
    """AdamW steps on image samples alone leave every decoder B exactly as it was and a text-only sample's logits
    bitwise unchanged (the shared down-projection A moves, but B·z stays 0); steps on text alone leave every D
    as it was. The tuned modality's path does move, and its loss falls. (No weight decay: a text-only batch with
    `pixel_values` gives the image side zero gradients, which AdamW's decay alone would still shrink.)"""
    model = modality_lavin()
    image = tuned == "image"
    train_batch = lavin_batch(model, has_image=(image, image), seed=1)
    probe = lavin_batch(model, has_image=(not image, not image), seed=2)  # the other modality
    before = logits(model, probe)
    kept = [up.weight.detach().clone() for up in decoder_paths(model, 0 if image else 1)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = train_steps(model, train_batch, 5, optimizer=optimizer)
    assert losses[-1] < losses[0]
    model.eval()
    assert torch.equal(logits(model, probe), before)
    assert all(torch.equal(up.weight, w) for up, w in zip(decoder_paths(model, 0 if image else 1), kept))
    assert all(up.weight.abs().max() > 0 for up in decoder_paths(model, 1 if image else 0))


def test_generate_save_reload_and_merge(tmp_path):
    """Cached greedy decoding equals uncached; a mixed batch under beam search equals each sample alone (every
    beam keeps its sample's weights); the saved adapter reloads to bitwise logits and keeps the router setting;
    merged for a modality, the logits of that modality's samples stay within 1e-5."""
    model = modality_lavin(init_weights=False)
    batch = lavin_batch(model, has_image=(True, False))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    common = dict(do_sample=False, max_new_tokens=4, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**inputs, **common)
        uncached = model.generate(**inputs, **common, use_cache=False)
        beams = model.generate(**inputs, **common, num_beams=2)
        alone = [model.generate(**{k: v[i : i + 1] for k, v in inputs.items()}, **common, num_beams=2) for i in (0, 1)]
    assert torch.equal(cached, uncached) and torch.equal(cached[:, :9], batch["input_ids"])
    for row in (0, 1):
        assert torch.equal(beams[row, : alone[row].shape[1]], alone[row][0])
    sampled = model.generate(**inputs, do_sample=True, num_return_sequences=3, max_new_tokens=3, pad_token_id=0)
    assert sampled.shape == (6, 9 + 3)
    routed = logits(model, batch)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert reloaded.peft_config["default"].router == "modality"
    assert torch.equal(logits(reloaded, batch), routed)
    for modality, row in (("text", 1), ("image", 0)):
        with torch.no_grad():
            reloaded.merge_adapter(modality=modality)
            merged = logits(reloaded, batch)
            reloaded.unmerge_adapter()
        torch.testing.assert_close(merged[row], routed[row], atol=1e-5, rtol=0)


def test_bad_router_settings_are_refused():
    with pytest.raises(ValueError, match="`router`='auto' is not one of"):
        LaVINConfig(router="auto")
    with pytest.raises(ValueError, match="needs `adapter_placement='attn'`"):
        LaVINConfig(router="modality", adapter_placement="block")


def test_merging_again_for_the_other_modality_is_refused_and_unmerge_restores_the_base():
    """A merged layer keeps the routing it was folded with: merging it again for the other modality raises and
    changes nothing, merging it again for the same one is a no-op, and unmerging gives the base weights back."""
    model = get_peft_model(tiny_llama(), LaVINConfig(router="modality", init_weights=False)).eval()
    q_proj = model.base_model.model.model.layers[0].self_attn.base_layer.q_proj
    before = q_proj.weight.detach().clone()
    model.base_model.merge_adapter(modality="image")
    merged = q_proj.weight.detach().clone()
    with pytest.raises(ValueError, match=r"merged for another modality than .text.; call `unmerge_adapter\(\)`"):
        model.base_model.merge_adapter(modality="text")
    assert torch.equal(q_proj.weight, merged)
    with pytest.warns(UserWarning, match="already merged"):
        model.base_model.merge_adapter(modality="image")
    assert torch.equal(q_proj.weight, merged)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(q_proj.weight, before, atol=1e-6, rtol=0)
