"""The MM-adapter and the router side pass against the independent reference in `reference/lavin_ref.py`."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VIT, tiny_llama
from peft import get_peft_model
from reference.lavin_ref import adapter_tensors, dense_up, official_logits, vision_tokens
from transformers import DynamicCache

from peft_mma import LaVINConfig
from peft_mma.lavin import GroupedLinear
from peft_mma.lavin.call import Call
from peft_mma.router import is_lone_token_attention, lone_token_attention


def lavin(kind="mha", attn="eager", **kwargs):
    torch.manual_seed(1)
    config = LaVINConfig(init_weights=False, adapter_dropout=0.0, **kwargs)
    model = get_peft_model(tiny_llama(kind, attn), config)
    with torch.no_grad():  # a non-trivial modality embedding and routers, so each modality routes differently
        model.base_model.mma_lavin_modality["default"].normal_(0, 3)
    return model.eval()


def test_grouped_linear_is_block_diagonal():
    torch.manual_seed(0)
    layer = GroupedLinear(8, 32, groups=2)
    torch.nn.init.normal_(layer.weight), torch.nn.init.normal_(layer.bias)
    z = torch.randn(3, 5, 8)
    torch.testing.assert_close(layer(z), z @ dense_up(layer.weight.detach()).T + layer.bias, atol=1e-6, rtol=0)
    assert layer.dense()[:16, 4:].abs().sum() == 0 and layer.dense()[16:, :4].abs().sum() == 0


def test_identity_init():
    model = get_peft_model(tiny_llama(), LaVINConfig())
    for name, module in model.named_modules():
        if name.endswith("mma_lavin_up0.default") or name.endswith("mma_lavin_up1.default"):
            assert module.weight.abs().sum() == 0 and module.bias.abs().sum() == 0


@pytest.mark.parametrize("kind, attn", [("mha", "eager"), ("gqa", "sdpa"), ("odd_head_dim", "eager")])
def test_side_pass_equals_official_masked_modality_token(kind, attn):
    model = lavin(kind, attn, temperature=5.0)
    reference = tiny_llama(kind, "eager")  # same seed → same base weights
    adapters = [adapter_tensors(layer.self_attn) for layer in model.base_model.model.model.layers]
    embedding = model.base_model.mma_lavin_modality["default"].detach()
    ids = torch.randint(3, 97, (2, 9))
    modality = torch.tensor([0, 1])
    with torch.no_grad():
        embeds = reference.model.embed_tokens(ids)
        expected = official_logits(reference, adapters, embedding, embeds, modality, 1.0, 5.0)
        # a text-only call routes both rows as text; compare row 0, then route row 1 as an image through the
        # image path with the same text (the reference has no visual tokens, so pass the routing directly)
        got_text = model(input_ids=ids).logits
        routing = model.base_model._routing("default", Call(), modality.bool(), 2)
        got_mixed = model.base_model.model(input_ids=ids, lavin_routing=routing).logits
    torch.testing.assert_close(got_text[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_mixed, expected, atol=1e-5, rtol=0)
    assert (got_mixed[1] - got_text[1]).abs().max() > 1e-3  # the image route differs from the text route


@pytest.mark.parametrize("kind, attn", [("mha", "eager"), ("gqa", "sdpa"), ("odd_head_dim", "eager")])
def test_lone_token_attention_is_the_attention_of_one_token(kind, attn):
    """The side pass's shortcut o_proj(repeat_kv(v_proj(x))) equals LLaMA's attention over one token at position 0,
    in value and in the gradients of x and of every projection (q and k get none from either)."""
    attention = tiny_llama(kind, attn, seed=3).model.layers[1].self_attn.train()
    llama = tiny_llama(kind, attn, seed=3).model
    x = torch.randn(2, 1, 32)
    position_embeddings = llama.rotary_emb(x, torch.zeros(2, 1, dtype=torch.long))

    def grads(output: torch.Tensor, inputs: torch.Tensor) -> list[torch.Tensor]:
        params = [attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight, attention.o_proj.weight]
        weights = torch.randn_like(output)
        return torch.autograd.grad((output * weights.detach()).sum(), [inputs, *params], allow_unused=True)

    torch.manual_seed(0)
    x_full, x_lone = x.clone().requires_grad_(), x.clone().requires_grad_()
    full = attention(x_full, position_embeddings=position_embeddings, attention_mask=None)[0]
    torch.manual_seed(0)
    full_grads = grads(full, x_full)
    assert is_lone_token_attention(attention, x_lone, {"attention_mask": None})
    lone = lone_token_attention(attention, x_lone)
    torch.manual_seed(0)
    lone_grads = grads(lone, x_lone)
    torch.testing.assert_close(lone, full, atol=1e-6, rtol=1e-6)
    for got, expected in zip(lone_grads, full_grads):
        if got is None:  # q and k: not used by the shortcut, and a zero gradient in the full attention
            assert expected is None or expected.abs().max() < 1e-6
        else:
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("placement", ["attn", "block"])
def test_side_pass_shortcut_keeps_every_gradient(placement, monkeypatch):
    """A training step's loss and the gradient of every trainable parameter (the modality embedding and routers,
    which only the side pass reaches, included) are those of the side pass through the full attention."""
    import peft_mma.lavin.layer as lavin_layer

    ids = torch.randint(3, 97, (2, 7))

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = lavin("gqa", "sdpa", adapter_placement=placement).train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = step()
    monkeypatch.setattr(lavin_layer, "is_lone_token_attention", lambda *args: False)
    full_loss, full_grads = step()
    torch.testing.assert_close(loss, full_loss, atol=1e-6, rtol=0)
    assert grads.keys() == full_grads.keys() and any("modality" in n for n in grads)
    for name, grad in grads.items():
        assert grad is not None and full_grads[name] is not None, name
        torch.testing.assert_close(grad, full_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_lone_token_attention_only_where_exact():
    attention = tiny_llama("gqa", "sdpa").model.layers[0].self_attn
    one, two = torch.randn(2, 1, 32), torch.randn(2, 2, 32)
    assert is_lone_token_attention(attention.eval(), one, {})
    assert not is_lone_token_attention(attention, two, {})  # other keys
    assert not is_lone_token_attention(attention, one, {"attention_mask": torch.ones(2, 1, 1, 1)})
    assert not is_lone_token_attention(attention, one, {"any name": DynamicCache()})  # cached keys, by type
    attention.attention_dropout = 0.1
    assert is_lone_token_attention(attention.eval(), one, {})  # no dropout in eval
    assert not is_lone_token_attention(attention.train(), one, {})  # dropout would zero the one weight at times
    assert not is_lone_token_attention(torch.nn.Linear(32, 32), one, {})  # not a LLaMA attention


def test_block_placement_routes_ffn_adapter_from_its_own_input():
    model = lavin(adapter_placement="block")
    layer = model.base_model.model.model.layers[0]
    assert type(layer.mlp).__name__ == "MMAdapter" and layer.mlp.lavin_key.endswith("mlp")
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        out = model(input_ids=ids).logits
        model.base_model.model.model.layers[0].mlp.mma_lavin_up0["default"].weight.zero_()
        model.base_model.model.model.layers[0].mlp.mma_lavin_up1["default"].weight.zero_()
        changed = model(input_ids=ids).logits
    assert (out - changed).abs().max() > 1e-4  # the FFN adapter is live


def test_vision_tokens_match_reference_and_do_not_couple_images():
    model = lavin(
        vision_model="vit_large_patch14_clip_224.openai",
        vision_pretrained=False,
        vision_model_kwargs=TINY_VIT,
        vision_feature_every=2,
    )
    tuner = model.base_model
    encoder = tuner.mma_lavin_visual["default"].encoder
    adapters = [adapter_tensors(block.attn) for block in encoder.blocks]
    p_in, p_out = tuner.mma_lavin_proj_in["default"], tuner.mma_lavin_proj_out["default"]
    proj = dict(W1=p_in.weight.detach(), b1=p_in.bias.detach(), W2=p_out.weight.detach(), b2=p_out.bias.detach())
    pixels = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        batched = tuner.encode_images(pixels)
        alone = tuner.encode_images(pixels[1:2])
        expected = vision_tokens(encoder, adapters, pixels, 2, proj)
    assert batched.shape == (3, 2, 32)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone[0], batched[1], atol=1e-6, rtol=0)
