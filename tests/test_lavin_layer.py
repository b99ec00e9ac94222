"""The MM-adapter, the modality token and its routing against the independent reference in `reference/lavin_ref.py`."""

from __future__ import annotations

import pytest
import torch
from conftest import lavin_batch, tiny_lavin, tiny_llama, top_level_ops
from peft import get_peft_model
from reference.lavin_ref import adapter_tensors, dense_up, official_logits, vision_tokens

from peft_mma import LaVINConfig
from peft_mma.lavin import GroupedLinear

KINDS = [("mha", "eager"), ("gqa", "sdpa"), ("odd_head_dim", "eager")]


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


def reference_inputs(model, batch, detach=True):
    """What the official formulation gets for `batch`: the embeddings with the model's own visual tokens at the
    placeholders, the adapters' tensors, the modality embedding and the per-sample modality."""
    tuner = model.base_model
    ids, placeholders = batch["input_ids"], batch["input_ids"] == model.peft_config["default"].image_token_id
    embeds = tuner.model.get_input_embeddings()(ids.masked_fill(placeholders, 0))
    visual = tuner.encode_images(batch["pixel_values"])  # (B, n, C)
    rows = []
    for i in range(len(ids)):  # write each image's tokens at its placeholders, one by one
        row, k = list(embeds[i]), 0
        for j in range(len(row)):
            if placeholders[i, j]:
                row[j], k = visual[i, k], k + 1
        rows.append(torch.stack(row))
    embeds = torch.stack(rows)
    adapters = [adapter_tensors(layer.self_attn, detach=detach) for layer in tuner.model.model.layers]
    modality = placeholders.any(-1).long()
    embedding = tuner.mma_lavin_modality["default"]
    if detach:
        embeds, embedding = embeds.detach(), embedding.detach()
    return embeds, adapters, embedding, modality


@pytest.mark.parametrize("kind, attn", KINDS)
def test_modality_token_in_the_call_gives_the_official_logits(kind, attn):
    """Text and image samples in one batch: the official formulation (the token at position 0 of a custom 4D mask
    that hides it from every other token) with the same visual tokens; at the official RoPE positions (text at 1..S)
    up to rounding, and at ours (text at 0..S−1) to 1e-6."""
    model = tiny_lavin(kind, attn, temperature=5.0)
    batch = lavin_batch(model, has_image=(False, True))
    reference = tiny_llama(kind, "eager")  # same seed → same base weights
    with torch.no_grad():
        got = model(**batch).logits
        embeds, adapters, embedding, modality = reference_inputs(model, batch)
        official = official_logits(reference, adapters, embedding, embeds, modality, 1.0, 5.0)
        ours = official_logits(reference, adapters, embedding, embeds, modality, 1.0, 5.0, torch.arange(9))
    real = batch["attention_mask"][..., None].bool()  # the reference has no padding mask: compare real tokens
    torch.testing.assert_close(got * real, official * real, atol=1e-5, rtol=0)
    torch.testing.assert_close(got * real, ours * real, atol=1e-6, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_the_kernel_runs_on_the_tokens_after_the_modality_token(monkeypatch, padded):
    """The learnt router's modality token stays out of the wrapped kernel's call: its queries, keys and values are the
    positions after it, with no mask on an unpadded batch (SDPA's causal kernel, which reads grouped key/value heads
    as they are; given a mask, transformers repeats them and keeps the copies for backward) and the caller's mask
    over those positions on a padded one; the logits are those of the official formulation (test above)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_lavin("gqa", "sdpa")
    config = model.config
    sdpa, calls = ALL_ATTENTION_FUNCTIONS["sdpa"], []

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append((tuple(query.shape), tuple(key.shape), None if attention_mask is None else attention_mask.shape))
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", spy)
    batch = lavin_batch(model, has_image=(True, False) if padded else (True, True))
    length = batch["input_ids"].shape[1]
    assert bool((batch["attention_mask"] == 0).any()) == padded
    model.train()
    model(**batch).loss.backward()
    head_dim = config.hidden_size // config.num_attention_heads
    query, key = (2, config.num_attention_heads, length, head_dim), (2, config.num_key_value_heads, length, head_dim)
    mask = (2, 1, length, length) if padded else None
    assert calls == [(query, key, mask)] * config.num_hidden_layers


def test_without_modality_token_slices_the_masks_kernels_take_and_refuses_others():
    from peft_mma.router import without_modality_token

    square, padding = torch.zeros(2, 1, 5, 5), torch.ones(2, 5)
    assert without_modality_token(None, 1) is None
    assert without_modality_token(square, 1).shape == (2, 1, 4, 4) and without_modality_token(
        square[:, :, -1:], 0
    ).shape == (2, 1, 1, 4)
    assert torch.equal(without_modality_token(square, 1), square[:, :, 1:, 1:])
    assert without_modality_token(padding, 1).shape == (2, 4)
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        without_modality_token(object(), 1)


@pytest.mark.parametrize("kind, attn", KINDS)
def test_routing_weights_are_the_official_tokens_alone(kind, attn):
    """Every layer's weights for each modality (`modality_routing`) equal the official formulation's on the
    modality token alone to 1e-6, and the two modalities route differently."""
    model = tiny_lavin(kind, attn)
    reference = tiny_llama(kind, "eager")
    adapters = [adapter_tensors(layer.self_attn) for layer in model.base_model.model.model.layers]
    embedding = model.base_model.mma_lavin_modality["default"].detach()
    record: list[torch.Tensor] = []
    with torch.no_grad():
        routing = model.base_model.modality_routing()
        official_logits(reference, adapters, embedding, torch.zeros(2, 0, 32), torch.tensor([0, 1]), record=record)
    assert list(routing) == [f"model.layers.{i}.self_attn" for i in range(4)]
    for got, expected in zip(routing.values(), record):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert all((w[0] - w[1]).abs().max() > 1e-3 for w in routing.values())


@pytest.mark.parametrize("placement", ["attn", "block"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_loss_and_every_gradient_are_the_official_formulation(placement, checkpointing):
    """A mixed batch's loss and the gradient of every trainable parameter (the modality embedding, the routers, the
    projector and the encoder's adapters included) equal those of the official formulation to 1e-6, with and
    without gradient checkpointing."""
    model = tiny_lavin("gqa", "sdpa", adapter_placement=placement).train()
    if checkpointing:
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = lavin_batch(model, has_image=(True, False))
    loss = model(**batch).loss
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    if placement == "block":  # the reference has no FFN adapter: compare the loss's dependence on it only
        assert all(g.abs().sum() > 0 for n, g in grads.items() if ".mlp." in n)
        return
    reference = tiny_llama("gqa", "eager")
    embeds, adapters, embedding, modality = reference_inputs(model, batch, detach=False)
    logits = official_logits(reference, adapters, embedding, embeds, modality, text_positions=torch.arange(9))
    labels = batch["labels"]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
    expected_grads = torch.autograd.grad(expected, list(params.values()))
    for (name, got), want in zip(grads.items(), expected_grads):
        assert got.abs().sum() > 0, name
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)


def test_block_placement_routes_ffn_adapter_from_its_own_input():
    model = tiny_lavin(adapter_placement="block", vision_model=None)
    layer = model.base_model.model.model.layers[0]
    assert type(layer.mlp).__name__ == "MMAdapter" and layer.mlp.lavin_key.endswith("mlp")
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        out = model(input_ids=ids).logits
        routing = model.base_model.modality_routing()
        layer.mlp.mma_lavin_up0["default"].weight.zero_()
        layer.mlp.mma_lavin_up1["default"].weight.zero_()
        changed = model(input_ids=ids).logits
    assert (out - changed).abs().max() > 1e-4  # the FFN adapter is live
    assert "model.layers.0.mlp" in routing and not torch.equal(
        routing["model.layers.0.mlp"], routing[layer.self_attn.lavin_key]
    )


def test_vision_tokens_match_reference_and_do_not_couple_images():
    model = tiny_lavin()
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


@pytest.mark.parametrize("per_token", [False, True], ids=["per-sample", "per-token"])
@pytest.mark.parametrize("routed", [True, False], ids=["routed", "given-weights"])
@pytest.mark.parametrize("scale, p", [(1.0, 0.0), (0.5, 0.3)])
@pytest.mark.parametrize("bias", [True, False], ids=["biases", "no-biases"])
def test_routed_adapter_node_has_the_gradients_of_its_formula(per_token, routed, scale, p, bias):
    """`RoutedAdapter`'s hand-written backward against finite differences (float64, `torch.autograd.gradcheck`),
    with and without dropout (the same mask in every evaluation), routing each sample from its modality token x[:, 0]
    or each token from itself, with up-path biases or without (`adapter_bias=False`), and its value against the
    plain formula."""
    from peft_mma.lavin.function import RoutedAdapter

    generator = torch.Generator().manual_seed(0)

    def rand(*shape, std=0.5):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * std).requires_grad_()

    x, down_w, down_b = rand(2, 5, 8), rand(4, 8), rand(4)
    ups = [rand(2, 4, 2), rand(8), rand(2, 4, 2), rand(8)]  # B, b, D, d with g = 2 groups: (2, 4, 2) each
    if not bias:
        ups[1] = ups[3] = None
    router_w, router_b = rand(2, 8, std=2.0), rand(2)
    given = None
    if not routed:
        given = torch.rand(2, 5, 2, generator=generator, dtype=torch.float64) if per_token else torch.rand(2, 2)
        given = given / given.sum(-1, keepdim=True)

    def adapter(*inputs):
        torch.manual_seed(1)  # the same dropout mask in every evaluation
        return RoutedAdapter.apply(*inputs, 5.0, scale, p, per_token, given)[0]

    inputs = (x, down_w, down_b, *ups, router_w, router_b)
    assert torch.autograd.gradcheck(adapter, inputs, eps=1e-6, atol=1e-6)
    if p == 0:
        t = x if per_token else x[:, :1]  # (2, 5 or 1, 8)
        w = torch.softmax((t @ router_w.T + router_b) / 5.0, -1) if routed else given.view(2, -1, 2).double()
        z = x @ down_w.T + down_b
        paths = [z @ dense_up(ups[i]).T + (ups[i + 1] if bias else 0.0) for i in (0, 2)]
        expected = x + scale * (w[..., :1] * paths[0] + w[..., 1:] * paths[1])
        torch.testing.assert_close(adapter(*inputs), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("per_token", [False, True], ids=["per-sample", "per-token"])
def test_routed_adapter_computes_in_the_activations_dtype(per_token):
    """bfloat16 activations and float32 parameters (PEFT's default): the output is bfloat16, every tensor of the
    activations' size that the node keeps for backward is bfloat16 (no float32 round trip), the parameters'
    gradients are float32, and values and gradients are those of the node in float64 with the parameters rounded to
    bfloat16, to bfloat16's precision."""
    from peft_mma.lavin.function import RoutedAdapter

    generator = torch.Generator().manual_seed(0)
    shapes = [(8, 64), (8,), (2, 32, 4), (64,), (2, 32, 4), (64,), (2, 64), (2,)]  # A, a, B, b, D, d, W_m, b_m
    params = [(torch.randn(shape, generator=generator) * 0.3).requires_grad_() for shape in shapes]
    x = torch.randn(2, 24, 64, generator=generator).bfloat16().requires_grad_()
    grad = torch.randn(2, 24, 64, generator=generator).bfloat16()
    kept = []

    def keep(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = RoutedAdapter.apply(x, *params, 10.0, 0.5, 0.0, per_token, None)[0]
    out.backward(grad)
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in kept if t.numel() >= x.numel())
    assert all(p.grad.dtype == torch.float32 for p in params)

    x64 = x.detach().double().requires_grad_()
    params64 = [p.detach().bfloat16().double().requires_grad_() for p in params]
    out64 = RoutedAdapter.apply(x64, *params64, 10.0, 0.5, 0.0, per_token, None)[0]
    out64.backward(grad.double())
    torch.testing.assert_close(out.double(), out64, atol=0.05, rtol=0.02)
    for got, want in zip([x.grad, *[p.grad for p in params]], [x64.grad, *[p.grad for p in params64]]):
        torch.testing.assert_close(got.double(), want, atol=0.05 * want.abs().max().item(), rtol=0.02)


def test_routed_adapter_packs_and_unpacks_its_paths():
    """`paths` writes B, b, D, d as the two (r, C) matrices [B_denseᵀ; bᵀ; 0], [D_denseᵀ; dᵀ; 0] with r = 16, h + 1
    rounded up to a multiple of 8; `path_grads` reads the parameters' entries back (g = 4 groups of 3 × 2 blocks,
    C = 12, h = 8)."""
    from peft_mma.lavin.function import path_grads, path_rows, paths, with_ones

    assert [path_rows(h) for h in (1, 7, 8, 15, 16)] == [8, 8, 16, 16, 24]
    z = torch.randn(3, 8)
    assert torch.equal(with_ones(z), torch.cat([z, torch.ones(3, 8)], 1))
    up0_w, up0_b, up1_w, up1_b = torch.randn(4, 3, 2), torch.randn(12), torch.randn(4, 3, 2), torch.randn(12)
    packed, scatter = paths(up0_w, up0_b, up1_w, up1_b)
    assert packed.shape == (2, 16 * 12)
    zeros = torch.zeros(7, 12)
    for got, (weight, bias) in zip(packed.view(2, 16, 12), [(up0_w, up0_b), (up1_w, up1_b)]):
        torch.testing.assert_close(got, torch.cat([dense_up(weight).T, bias[None], zeros]), atol=0, rtol=0)
    back = path_grads(packed, scatter, up0_w.shape)
    for got, want in zip(back, (up0_w, up0_b, up1_w, up1_b)):
        assert torch.equal(got, want)
    # without biases (`adapter_bias=False`) P's row h is zero too and the biases get no gradient
    packed, scatter = paths(up0_w, None, up1_w, None)
    for got, weight in zip(packed.view(2, 16, 12), (up0_w, up1_w)):
        torch.testing.assert_close(got, torch.cat([dense_up(weight).T, torch.zeros(8, 12)]), atol=0, rtol=0)
    g_up0, g_b0, g_up1, g_b1 = path_grads(packed, scatter, up0_w.shape)
    assert torch.equal(g_up0, up0_w) and torch.equal(g_up1, up1_w) and g_b0 is None and g_b1 is None


@pytest.mark.parametrize("per_token", [False, True], ids=["per-sample", "per-token"])
def test_routed_adapter_node_dispatches_few_ops(per_token):
    """One decoder adapter in training (routing, dropout) is 14 ops forward and 25 backward, an encoder adapter
    (per-token routing) 17 and 29: on a GPU a step costs what it dispatches (`benchmarks/README.md`, "Ops per train
    step"), and with 8 gradients' `detach` they are most of the decoder's 53 ops per layer."""
    from peft_mma.lavin.function import RoutedAdapter

    x = torch.randn(2, 5, 8, requires_grad=True)
    shapes = [(4, 8), (4,), (2, 4, 2), (8,), (2, 4, 2), (8,), (2, 8), (2,)]  # A, a, B, b, D, d, W_m, b_m
    params = [torch.randn(shape, requires_grad=True) for shape in shapes]

    def run():
        outputs["out"] = RoutedAdapter.apply(x, *params, 10.0, 1.0, 0.1, per_token, None)[0]

    outputs = {}
    run()  # builds the paths' index tensors once (cached per shape and device)
    forward = top_level_ops(run)
    grad = torch.ones_like(x)
    backward = top_level_ops(lambda: torch.autograd.grad(outputs["out"], [x, *params], grad))
    assert len(forward) <= (17 if per_token else 14), forward
    assert len(backward) <= (29 if per_token else 25), backward  # nothing for the 8 gradients' `detach`


@pytest.mark.parametrize("per_token", [False, True], ids=["per-sample", "per-token"])
def test_compiled_routed_adapter_keeps_its_index_tensors_as_constants(per_token):
    """Under `torch.compile` the paths' index tensors are constants of the graph: neither graph rebuilds them on
    every call (an `arange`, `full`, `index_put` … per adapter and step before), Dynamo warns of no `lru_cache`,
    and values and gradients are the eager ones."""
    import collections
    import warnings

    from torch._dynamo.backends.common import aot_autograd

    from peft_mma.lavin.function import RoutedAdapter

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    shapes = [(4, 8), (4,), (2, 4, 2), (8,), (2, 4, 2), (8,), (2, 8), (2,)]  # A, a, B, b, D, d, W_m, b_m
    params = [torch.randn(shape, requires_grad=True) for shape in shapes]

    def loss(x):
        return RoutedAdapter.apply(x, *params, 10.0, 0.5, 0.0, per_token, None)[0].square().sum()

    graphs = []

    def keep(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(loss, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
        got = torch.autograd.grad(compiled(x), [x, *params])
    torch._dynamo.reset()
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    assert len(graphs) == 2  # forward and backward
    ops = collections.Counter(str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function")
    built = {op for op in ops if op.split(".")[1:2] in (["arange"], ["full"], ["index_put"], ["zeros"])}
    assert not built, ops
    expected = torch.autograd.grad(loss(x), [x, *params])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
