"""Checks of the reference itself (`llama_adapter_v2_ref.py`) against independent constructions.

- No adapter: equals `LlamaForCausalLM` logits (eager and sdpa, MHA/GQA/odd `head_dim`, left padding).
- Bias / scale / LoRA / norm delta: equals a copy of the HF model with the adaptation folded into its weights.
- Gated prompt: equals the HF model with hooks that add the prompt term to the `o_proj` input, computed from
  HF's own `apply_rotary_pos_emb`/`repeat_kv` and torch's `scaled_dot_product_attention`.
- Visual bridge: equals `torch.nn.Linear`/`LayerNorm` and timm `Block` modules holding the same weights.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from peft_mma.vision.bridge import AdapterV2VisualBridge
from tests.conftest import tiny_llama
from tests.reference.llama_adapter_v2_ref import (
    LINEAR_NAMES,
    reference_logits_from_model,
    reference_visual_bridge,
)

ATOL = 1e-5
MODULE_OF = {name: "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for name in LINEAR_NAMES}
KINDS = [
    ("mha", "eager"),
    ("mha", "sdpa"),
    ("gqa", "eager"),
    ("gqa", "sdpa"),
    ("odd_head_dim", "eager"),
    ("odd_head_dim", "sdpa"),
]


def _inputs(vocab: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ids (2, 7); with `padded`, row 1 is left-padded by 3."""
    ids = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(1))
    if not padded:
        return ids, None
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


@torch.no_grad()
def _hf_logits(model, ids, mask) -> torch.Tensor:
    position_ids = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits


def _assert_close_on_tokens(actual, expected, mask, atol=ATOL) -> float:
    assert torch.isfinite(actual).all(), "the reference produced NaN/inf (padded rows included)"
    keep = torch.ones(actual.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(actual[keep], expected[keep], atol=atol, rtol=0)
    return (actual[keep] - expected[keep]).abs().max().item()


def _linear(model, layer: int, name: str) -> nn.Linear:
    return getattr(getattr(model.model.layers[layer], MODULE_OF[name]), name)


def _randn(*shape, scale=0.3):
    return scale * torch.randn(*shape)


# ------------------------------------------------------------------------------------------------ base model


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("kind, attn", KINDS, ids=["-".join(k) for k in KINDS])
def test_empty_adapter_equals_hf_logits(kind, attn, padded):
    model = tiny_llama(kind, attn)
    ids, mask = _inputs(model.config.vocab_size, padded)
    _assert_close_on_tokens(reference_logits_from_model(model, ids, mask, {}), _hf_logits(model, ids, mask), mask)


def _tiny_with_base_biases(kind: str, attn: str, biased: bool, **overrides):
    """`tiny_llama`, with random base biases b0 on every linear when `biased`."""
    model = tiny_llama(kind, attn, attention_bias=biased, mlp_bias=biased, **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(_randn(*p.shape))
    return model


def test_base_biases_and_rope_theta_equal_hf_logits():
    model = _tiny_with_base_biases("gqa", "sdpa", True, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    ids, mask = _inputs(model.config.vocab_size, padded=True)
    _assert_close_on_tokens(reference_logits_from_model(model, ids, mask), _hf_logits(model, ids, mask), mask)


# ------------------------------------------------------------------------------------------------ linear adapters


def _random_linear_adapter(model, parts: set[str], scale_side: str, names=LINEAR_NAMES) -> dict:
    """Random bias/scale/LoRA entries on every layer's `names`, and random norm deltas if "norm" in parts."""
    torch.manual_seed(2)
    linear = {}
    for layer in range(model.config.num_hidden_layers):
        for name in names:
            base = _linear(model, layer, name)
            out_f, in_f = base.weight.shape
            entry = {}
            if "bias" in parts:
                entry["bias"] = _randn(out_f)
            if "scale" in parts:
                entry["scale"] = 1 + _randn(out_f if scale_side == "output" else in_f)
            if "lora" in parts:
                entry |= {"lora_A": _randn(3, in_f), "lora_B": _randn(out_f, 3), "lora_scaling": 0.7}
            linear[(layer, name)] = entry
    norm = {}
    if "norm" in parts:
        c = model.config.hidden_size
        norm = {
            (layer, n): _randn(c)
            for layer in range(model.config.num_hidden_layers)
            for n in ("input_layernorm", "post_attention_layernorm")
        }
        norm[(None, "norm")] = _randn(c)
    return {"linear": linear, "scale_side": scale_side, "norm": norm}


@torch.no_grad()
def _folded(model, adapter: dict):
    """A copy of `model` with the adapter folded in: output side W' = diag(s)(W + s_l·BA), b' = s ⊙ (b0 + b);
    input side W' = (W + s_l·BA)·diag(s), b' = b0 + b; norms w' = w + Δ."""
    folded = copy.deepcopy(model)
    for (layer, name), entry in adapter.get("linear", {}).items():
        base = _linear(folded, layer, name)
        w = base.weight.clone()
        b = base.bias.clone() if base.bias is not None else torch.zeros(w.shape[0])
        if entry.get("lora_A") is not None:
            w += entry.get("lora_scaling", 1.0) * entry["lora_B"] @ entry["lora_A"]
        if entry.get("bias") is not None:
            b += entry["bias"]
        s = entry.get("scale")
        if s is not None and adapter.get("scale_side", "output") == "output":
            w, b = s[:, None] * w, s * b
        elif s is not None:
            w = w * s[None, :]
        new = nn.Linear(w.shape[1], w.shape[0], bias=True)
        new.weight.copy_(w)
        new.bias.copy_(b)
        setattr(getattr(folded.model.layers[layer], MODULE_OF[name]), name, new)
    for (layer, name), delta in adapter.get("norm", {}).items():
        module = folded.model.norm if layer is None else getattr(folded.model.layers[layer], name)
        module.weight += delta
    return folded


@pytest.mark.parametrize(
    "parts, scale_side",
    [
        ({"bias"}, "output"),
        ({"scale"}, "output"),
        ({"scale"}, "input"),
        ({"lora"}, "output"),
        ({"norm"}, "output"),
        ({"bias", "scale", "lora", "norm"}, "output"),
        ({"bias", "scale", "lora", "norm"}, "input"),
    ],
    ids=["bias", "scale_out", "scale_in", "lora", "norm", "all_out", "all_in"],
)
@pytest.mark.parametrize("kind, attn", [("gqa", "eager"), ("odd_head_dim", "sdpa")], ids=["gqa", "odd_head_dim"])
def test_linear_and_norm_adapters_equal_folded_hf_model(kind, attn, parts, scale_side):
    model = _tiny_with_base_biases(kind, attn, biased=len(parts) > 1)
    adapter = _random_linear_adapter(model, parts, scale_side)
    ids, mask = _inputs(model.config.vocab_size, padded=True)
    expected = _hf_logits(_folded(model, adapter), ids, mask)
    assert (expected - _hf_logits(model, ids, mask)).abs().max() > 1e-2  # the adaptation matters
    _assert_close_on_tokens(reference_logits_from_model(model, ids, mask, adapter), expected, mask)


# ------------------------------------------------------------------------------------------------ gated prompt


def _prompt_hooks(model, adapter: dict, kv_modules: dict):
    """Hooks adding act(g)[h]·ν·softmax(q kpᵀ/√d) vp to each prompted layer's `o_proj` input.

    q is recomputed from the captured attention input with the model's own `q_proj` and HF's RoPE;
    kp/vp come from `kv_modules[layer] = (k_linear, v_linear)`; the attention is torch SDPA with no mask.
    """
    cfg = model.config
    head_dim = cfg.head_dim
    handles, captured = [], {}
    for layer, prompt in adapter["prompt"].items():
        attn = model.model.layers[layer].self_attn

        def capture(module, args, kwargs, layer=layer):
            captured[layer] = (
                kwargs["hidden_states"] if "hidden_states" in kwargs else args[0],
                kwargs["position_embeddings"],
            )

        def add_prompt(module, args, layer=layer, attn=attn, prompt=prompt):
            x, (cos, sin) = captured[layer]
            b, t, _ = x.shape
            q = attn.q_proj(x).view(b, t, -1, head_dim).transpose(1, 2)  # (B, H, T, d)
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            p = prompt.expand(b, *prompt.shape) + adapter.get("visual", {}).get(layer, 0)  # (B, K, C)
            k_lin, v_lin = kv_modules[layer]
            kp = repeat_kv(k_lin(p).view(b, p.shape[1], -1, head_dim).transpose(1, 2), attn.num_key_value_groups)
            vp = repeat_kv(v_lin(p).view(b, p.shape[1], -1, head_dim).transpose(1, 2), attn.num_key_value_groups)
            term = F.scaled_dot_product_attention(q, kp, vp)  # (B, H, T, d)
            gate = adapter["gate"][layer]
            gate = gate.tanh() if adapter.get("gate_activation", "tanh") == "tanh" else gate
            gate = gate * adapter.get("gate_scale", {}).get(layer, torch.ones(1))
            term = (gate[None, :, None, None] * term).transpose(1, 2).reshape(b, t, -1)  # (B, T, H·d)
            return (args[0] + term,)

        handles.append(attn.register_forward_pre_hook(capture, with_kwargs=True))
        handles.append(attn.o_proj.register_forward_pre_hook(add_prompt))
    return handles


@pytest.mark.parametrize("kv_adapted", [False, True], ids=["kv_base", "kv_adapted"])
@pytest.mark.parametrize("num_prompt", [1, 3])
@pytest.mark.parametrize(
    "kind, attn", [("mha", "eager"), ("gqa", "sdpa"), ("odd_head_dim", "eager")], ids=["mha", "gqa", "odd_head_dim"]
)
def test_gated_prompt_equals_hf_with_o_proj_hooks(kind, attn, num_prompt, kv_adapted):
    model = _tiny_with_base_biases(kind, attn, biased=True)
    cfg = model.config
    # bias/scale/LoRA everywhere; the prompt's k/v come from a fold without LoRA (kv_adapted) or the base model
    adapter = _random_linear_adapter(model, {"bias", "scale"}, "output")
    no_lora = copy.deepcopy(adapter)
    for key, entry in _random_linear_adapter(model, {"lora"}, "output")["linear"].items():
        adapter["linear"][key] |= entry
    layers = [1, 3]
    adapter |= {
        "prompt": {layer: _randn(num_prompt, cfg.hidden_size, scale=1.0) for layer in layers},
        "gate": {layer: _randn(cfg.num_attention_heads, scale=1.0) for layer in layers},
        "gate_scale": {3: torch.tensor([0.6])},
        "visual": {layer: _randn(2, num_prompt, cfg.hidden_size, scale=1.0) for layer in layers},
        "prompt_kv_adapted": kv_adapted,
    }
    folded = _folded(model, adapter)
    source = _folded(model, no_lora) if kv_adapted else model
    kv = {
        layer: (source.model.layers[layer].self_attn.k_proj, source.model.layers[layer].self_attn.v_proj)
        for layer in layers
    }
    ids, mask = _inputs(cfg.vocab_size, padded=True)
    without_prompt = _hf_logits(folded, ids, mask)
    handles = _prompt_hooks(folded, adapter, kv)
    expected = _hf_logits(folded, ids, mask)
    for h in handles:
        h.remove()
    assert (expected - without_prompt).abs().max() > 1e-2  # the prompt matters
    _assert_close_on_tokens(reference_logits_from_model(model, ids, mask, adapter), expected, mask)


def test_zero_gate_is_identity_and_gate_activation_none_takes_raw_gate():
    model = tiny_llama("gqa")
    cfg = model.config
    ids, mask = _inputs(cfg.vocab_size, padded=True)
    prompt = {2: _randn(4, cfg.hidden_size, scale=1.0)}
    zero = reference_logits_from_model(model, ids, mask, {"prompt": prompt, "gate": {2: torch.zeros(4)}})
    torch.testing.assert_close(zero, reference_logits_from_model(model, ids, mask), atol=0, rtol=0)
    g = _randn(4, scale=1.0)
    tanh = reference_logits_from_model(model, ids, mask, {"prompt": prompt, "gate": {2: g}})
    raw = reference_logits_from_model(
        model, ids, mask, {"prompt": prompt, "gate": {2: g.tanh()}, "gate_activation": "none"}
    )
    torch.testing.assert_close(tanh, raw, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "adapter, match",
    [
        ({"prompts": {}}, "unknown adapter keys"),
        ({"scale_side": "both"}, "`scale_side` must be"),
        ({"prompt": {1: torch.zeros(2, 32)}}, "no `gate`"),
        ({"linear": {(0, "qkv"): {}}}, "bad `linear` key"),
        ({"linear": {(0, "q_proj"): {"lora_A": torch.zeros(2, 32)}}}, "given together"),
    ],
)
def test_malformed_adapter_is_rejected(adapter, match):
    model = tiny_llama("mha")
    with pytest.raises(ValueError, match=match):
        reference_logits_from_model(model, torch.ones(1, 3, dtype=torch.long), None, adapter)


# ------------------------------------------------------------------------------------------------ visual bridge


@pytest.mark.parametrize("block_eps", [1e-6, 1e-5])
def test_visual_bridge_equals_torch_and_timm_modules(block_eps):
    torch.manual_seed(3)
    cv, c, k, heads = 32, 24, 3, 4
    norm_layer = partial(nn.LayerNorm, eps=block_eps)
    clip_proj, clip_norm = nn.Linear(cv, cv), nn.LayerNorm(cv)
    blocks = [Block(cv, heads, qkv_bias=True, norm_layer=norm_layer).eval() for _ in range(2)]
    visual_proj, visual_norm = nn.Linear(cv, c), nn.LayerNorm(c)
    query = torch.randn(k, cv)
    modules = {
        "clip_proj": clip_proj,
        "clip_proj_norm": clip_norm,
        "visual_proj": visual_proj,
        "visual_proj_norm": visual_norm,
    } | {f"blocks.{i}": blk for i, blk in enumerate(blocks)}
    with torch.no_grad():
        for module in modules.values():
            for name, p in module.named_parameters():
                if "norm" in name or isinstance(module, nn.LayerNorm):
                    p.copy_(1 + _randn(*p.shape) if name.endswith("weight") else _randn(*p.shape))
    weights = {"query": query} | {
        f"{prefix}.{n}": t for prefix, m in modules.items() for n, t in m.state_dict().items()
    }
    features = torch.randn(2, 5, cv)
    with torch.no_grad():
        x = clip_norm(clip_proj(features))
        x = torch.cat([query.expand(2, -1, -1), x], dim=1)
        for blk in blocks:
            x = blk(x)
        expected = visual_norm(visual_proj(x[:, :k]))
    actual = reference_visual_bridge(features, weights, num_heads=heads, block_eps=block_eps)
    assert actual.shape == (2, k, c)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_visual_bridge_default_eps_is_the_official_one():
    """The reference's default block ε is the official 1e-5 (timm 0.3.2's `Block`), which timm 1.0 no longer
    gives by default (1e-6): the bridge must set it."""
    assert Block(16, 2, qkv_bias=True).norm1.eps == 1e-6
    bridge = AdapterV2VisualBridge(8, 12, query_length=2, width=16, depth=1, heads=2)
    assert bridge.visual_blocks[0].norm1.eps == bridge.visual_blocks[0].norm2.eps == 1e-5
