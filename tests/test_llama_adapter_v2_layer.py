"""The PEFT V2 layers against the independent reference in `tests/reference/` (written from the spec's equations)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import V2_VISION, logits_of, tiny_llama, token_ids, top_level_ops
from peft import get_peft_model
from reference.llama_adapter_v2_ref import reference_logits_from_model, reference_visual_bridge

from peft_mma import LlamaAdapterV2Config
from peft_mma.llama_adapter_v2.layer import Linear, Norm, OutputProjection


def adapter_dict(model, adapter: str = "default", visual: torch.Tensor | None = None) -> dict:
    """Our PEFT model's adapter, in the reference's plain-dict format."""
    config = model.peft_config[adapter]
    out = {"linear": {}, "norm": {}, "prompt": {}, "gate": {}, "gate_scale": {}, "visual": {}}
    out |= {"scale_side": config.scale_side, "gate_activation": config.gate_activation or "none"}
    out["prompt_kv_adapted"] = config.prompt_kv_adapted
    for name, module in model.base_model.model.named_modules():
        parts = name.split(".")
        layer = int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None
        if isinstance(module, Linear):
            entry = {
                "bias": module.mma_adapter_v2_bias.get(adapter),
                "scale": module.mma_adapter_v2_scale.get(adapter),
            }
            if adapter in module.mma_adapter_v2_lora_A:
                entry["lora_A"] = module.mma_adapter_v2_lora_A[adapter].weight
                entry["lora_B"] = module.mma_adapter_v2_lora_B[adapter].weight
                entry["lora_scaling"] = module.lora_scaling[adapter]
            out["linear"][(layer, parts[-1])] = entry
        if isinstance(module, OutputProjection) and adapter in module.mma_adapter_v2_prompt:
            out["prompt"][layer] = module.mma_adapter_v2_prompt[adapter]
            out["gate"][layer] = module.mma_adapter_v2_gate[adapter]
            if adapter in module.mma_adapter_v2_gate_scale:
                out["gate_scale"][layer] = module.mma_adapter_v2_gate_scale[adapter]
            if visual is not None and module.visual_fused[adapter]:
                out["visual"][layer] = visual
        if isinstance(module, Norm):
            out["norm"][(layer, parts[-1] if layer is not None else "norm")] = module.mma_adapter_v2_norm[adapter]
    return {k: v for k, v in out.items() if v != {}}


CASES = {
    "paper-default": dict(),
    "input-scale-adapted-kv": dict(scale_side="input", prompt_kv_adapted=True),
    "lora-bias-7b-like": dict(
        lora_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        r=2,
        bias_modules=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        scale_modules=[],
        prompt_gate_scale=True,
    ),
    "no-tanh-one-token": dict(gate_activation=None, prompt_length=1, prompt_layers=2),
    # the prompts' keys and values take the adapted k/v projections' bias and scale, never their LoRA
    "adapted-kv-with-lora": dict(prompt_kv_adapted=True, lora_modules=["q_proj", "k_proj", "v_proj"], r=2),
}


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_adapted_model_matches_the_reference(llama, options):
    plain = tiny_llama(*_kind(llama))
    model = get_peft_model(llama, LlamaAdapterV2Config(init_weights=False, **options)).eval()
    with torch.no_grad():
        for module in model.modules():  # non-trivial LoRA A/B and gate scales
            if isinstance(module, OutputProjection):
                for p in module.mma_adapter_v2_gate_scale.values():
                    p.uniform_(0.3, 1.5)
    x = token_ids(2, 9)
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding
    # Prompt keys carry no RoPE, so the prompt term depends on absolute positions: give both the positions that
    # `generate` uses for left padding.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(input_ids=x, attention_mask=mask, position_ids=positions).logits
        expected = reference_logits_from_model(plain, x, mask, adapter_dict(model), position_ids=positions)
    keep = mask.bool()
    assert (ours[keep] - reference_logits_from_model(plain, x, mask)[keep]).abs().max() > 0.05  # not an identity
    torch.testing.assert_close(ours[keep], expected[keep], atol=1e-5, rtol=0)


def _kind(llama) -> tuple[str, str]:
    config = llama.config
    kind = (
        "odd_head_dim"
        if config.head_dim * config.num_attention_heads != config.hidden_size
        else ("gqa" if config.num_key_value_heads < config.num_attention_heads else "mha")
    )
    return kind, config._attn_implementation


@pytest.mark.parametrize("fusion", ["early", "all"])
def test_visual_path_matches_the_reference(fusion):
    plain = tiny_llama("gqa", "eager")
    config = LlamaAdapterV2Config(**V2_VISION, init_weights=False, visual_fusion=fusion)
    model = get_peft_model(tiny_llama("gqa", "eager"), config).eval()
    images, x = torch.randn(2, 3, 28, 28), token_ids(2, 6)
    tuner = model.base_model
    bridge = tuner.mma_adapter_v2_visual["default"]
    with torch.no_grad():
        features = tuner.mma_vision_backbone["default"].tokens(images)
        weights = {k: v for k, v in bridge.state_dict().items() if not k.startswith("visual_query")}
        weights = {k.replace("visual_blocks.", "blocks."): v for k, v in weights.items()}
        weights["query"] = bridge.visual_query.weight
        visual = reference_visual_bridge(features, weights, num_heads=config.visual_heads)
        torch.testing.assert_close(bridge(features), visual, atol=1e-5, rtol=0)
        ours = model(input_ids=x, pixel_values=images).logits
        expected = reference_logits_from_model(plain, x, None, adapter_dict(model, visual=visual))
    fused = sum(m.visual_fused["default"] for m in model.modules() if isinstance(m, OutputProjection))
    assert fused == (1 if fusion == "early" else 3)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_output_scale_keeps_its_output_and_gives_autograd_gradients():
    from peft_mma.llama_adapter_v2.function import OutputScale

    z = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(OutputScale.apply, (z, s))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: kept.append(t.untyped_storage().data_ptr()) or t, lambda t: t
    ):
        y = OutputScale.apply(z * 1, s)
    assert y.untyped_storage().data_ptr() in kept and len(kept) == 2  # y and s: the output, not the input


def test_training_gradients_equal_plain_autograd(monkeypatch):
    from peft_mma.llama_adapter_v2 import layer

    model = get_peft_model(tiny_llama("gqa", "sdpa"), LlamaAdapterV2Config(init_weights=False))
    x = token_ids(2, 6)

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(input_ids=x).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def plain(x, weight, bias, scale, output_side):
        return F.linear(x, weight, bias) * scale if output_side else F.linear(x * scale, weight, bias)

    ours = gradients()
    monkeypatch.setattr(layer.OutputScale, "apply", staticmethod(lambda z, s: z * s))
    monkeypatch.setattr(layer.ScaledLinear, "apply", staticmethod(plain))
    for name, grad in gradients().items():
        torch.testing.assert_close(ours[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("output_side", [True, False], ids=["output-side", "input-side"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_scaled_linear_node_has_the_gradients_of_its_formula(output_side, with_bias):
    """`ScaledLinear`'s hand-written backward against finite differences (float64), and its value against the
    formula: y = s ⊙ (W x + β) or W (s ⊙ x) + β, W frozen."""
    from peft_mma.llama_adapter_v2.function import ScaledLinear

    generator = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(grad)

    x, weight = rand(2, 3, 5), rand(4, 5, grad=False)
    bias = rand(4) if with_bias else None
    scale = rand(4 if output_side else 5)
    inputs = (x, bias, scale) if with_bias else (x, scale)

    def layer(*args):
        x, bias, scale = args if with_bias else (args[0], None, args[1])
        return ScaledLinear.apply(x, weight, bias, scale, output_side)

    assert torch.autograd.gradcheck(layer, inputs, eps=1e-6, atol=1e-6)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: kept.append(t.untyped_storage().data_ptr()) or t, lambda t: t
    ):
        y = layer(*inputs)
    neighbour = y if output_side else x  # what the next (or previous) op keeps anyway: no activation of its own
    assert neighbour.untyped_storage().data_ptr() in kept and len(kept) == 3  # it, W and s
    b = bias if with_bias else 0
    expected = scale * (x @ weight.T + b) if output_side else (scale * x) @ weight.T + b
    torch.testing.assert_close(layer(*inputs), expected, atol=1e-12, rtol=0)


def test_the_tuned_norm_costs_one_op_over_the_base_norm_and_equals_its_formula():
    """(w + Δ) ⊙ n(x) on LlamaRMSNorm's own normalisation: at most one op (w + Δ) over the base norm's forward (fewer
    where the base casts to its own dtype), one more for a second adapter (Δ₁ + Δ₂, no `0 + Δ`), and the formula's
    value."""
    model = get_peft_model(tiny_llama(), LlamaAdapterV2Config(init_weights=False))
    norm = next(m for m in model.modules() if isinstance(m, Norm))
    base = norm.get_base_layer()
    x = torch.randn(2, 5, base.weight.shape[0], requires_grad=True)
    one = top_level_ops(lambda: norm(x))
    assert len(one) <= len(top_level_ops(lambda: base(x))) + 1 and one.count("aten::add") == 2  # ε, w + Δ
    model.add_adapter("other", LlamaAdapterV2Config(init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    deltas = norm.mma_adapter_v2_norm["default"] + norm.mma_adapter_v2_norm["other"]
    assert len(top_level_ops(lambda: norm(x))) == len(one) + 1
    expected = (base.weight + deltas) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + base.variance_epsilon)
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-6)


def test_tuned_norm_node_keeps_its_input_not_the_normalised_one():
    """`TunedRMSNorm`: the gradients of its formula (float64 gradcheck), LlamaRMSNorm's value and autograd's
    gradients in fp32, and for backward it keeps only x (which the base norm keeps too), r (one value per token) and
    w, not n(x), which would be one more tensor of the residual stream's size per norm."""
    from peft_mma.llama_adapter_v2.function import TunedRMSNorm

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: TunedRMSNorm.apply(x, w, 1e-5), (x, w))

    x, w = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y = TunedRMSNorm.apply(x, w, 1e-5)
    expected = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(y, expected)
    saved = y.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(2, 5, 8), (2, 5, 1), (8,)] and saved[0].data_ptr() == x.data_ptr()
    grad = torch.randn(y.shape, generator=generator)
    for got, want in zip(torch.autograd.grad(y, (x, w), grad), torch.autograd.grad(expected, (x, w), grad)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(6,), (4, 6), (2, 3, 6)], ids=["one-vector", "2-D", "3-D"])
def test_the_nodes_sum_their_parameter_gradients_over_tokens_only(shape):
    """Every leading dimension is tokens; a single vector is one token (its scale and bias gradients are not summed
    over its channels). Float64 gradcheck of the three nodes, each shape."""
    from peft_mma.llama_adapter_v2.function import OutputScale, ScaledLinear, TunedRMSNorm

    generator = torch.Generator().manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64).requires_grad_()

    weight = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    for side in (True, False):
        assert torch.autograd.gradcheck(
            lambda x, b, s, side=side: ScaledLinear.apply(x, weight, b, s, side), (rand(*shape), rand(6), rand(6))
        )
    assert torch.autograd.gradcheck(OutputScale.apply, (rand(*shape), rand(6)))
    assert torch.autograd.gradcheck(lambda x, w: TunedRMSNorm.apply(x, w, 1e-5), (rand(*shape), rand(6)))


def test_merge_adapter_refuses_a_zero_scale_entry_and_merges_nothing():
    """unmerge divides by s, so a zero entry (its weights multiplied by 0) cannot be undone: `merge_adapter` refuses
    it before touching any layer; `merge_and_unload`, which is final, folds it and keeps the logits."""
    model = get_peft_model(tiny_llama("gqa", "sdpa"), LlamaAdapterV2Config(init_weights=False, prompt_layers=0))
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        layer.mma_adapter_v2_scale["default"][3] = 0.0
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = token_ids(2, 6)
    expected = logits_of(model, input_ids=x)
    with pytest.raises(ValueError, match=r"scales `.*layers\.1\.self_attn\.q_proj` by 0 .*merge_and_unload"):
        model.base_model.merge_adapter()
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits_of(merged, input_ids=x), expected, atol=1e-5, rtol=0)


def test_a_tuned_norm_with_a_hook_gives_what_it_gives_without():
    """A norm with hooks (or not a plain `LlamaRMSNorm`) takes the general path, base(x) + Σ Δ ⊙ n(x): the same
    (w + Δ) ⊙ x / √(mean(x²) + ε) as the fused node."""
    model = get_peft_model(tiny_llama(), LlamaAdapterV2Config(init_weights=False)).eval()
    norm = model.base_model.model.model.layers[1].input_layernorm
    assert isinstance(norm, Norm)
    x = torch.randn(2, 5, 32) * 3
    base = norm.get_base_layer()
    expected = (
        (base.weight + norm.mma_adapter_v2_norm["default"])
        * x
        * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + base.variance_epsilon)
    )
    with torch.no_grad():
        plain = norm(x)
        handle = base.register_forward_pre_hook(lambda module, args: None)
        hooked = norm(x)
        handle.remove()
    assert norm.mma_adapter_v2_norm["default"].abs().max() > 0.05  # Δ counts
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=1e-5)
