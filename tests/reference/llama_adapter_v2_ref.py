"""Independent plain-torch reference of a LLaMA decoder with LLaMA-Adapter V2 adaptations, for tests only.

LLaMA-Adapter V2: Parameter-Efficient Visual Instruction Model, https://arxiv.org/abs/2304.15010
(spec: `shared/spec/llama_adapter_v2.md` §2, §3, §8, §9).

Written equation by equation from the spec, in fp32, without calling the Hugging Face model's forward or its
attention functions (only its config and weights are read) and without any upstream LLaMA-Adapter code (GPL).
It is deliberately slow and explicit: one function per equation, a shape comment on every reshape.

Entry points:

- `reference_logits(config, weights, input_ids, attention_mask=None, adapter=None, position_ids=None)`
  → logits (B, T, vocab). `weights` uses `LlamaForCausalLM.state_dict()` names.
- `reference_logits_from_model(model, input_ids, attention_mask=None, adapter=None, position_ids=None)`
  → the same, reading `model.config` and `model.state_dict()`.
- `reference_visual_bridge(features, weights, num_heads, block_eps=1e-5, norm_eps=1e-5)` → V (B, K, C).

Adapter dict (every key optional; a missing key or an empty dict means "no adaptation"):

    adapter = {
        "linear": {(layer_idx, name): {"bias": Tensor[out] | None,           # b, added after the base bias b0
                                       "scale": Tensor[out or in] | None,   # s, side chosen by "scale_side"
                                       "lora_A": Tensor[r, in] | None,
                                       "lora_B": Tensor[out, r] | None,
                                       "lora_scaling": float}},             # s_l, default 1.0
            # name ∈ q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
        "scale_side": "output" | "input",                                   # default "output"
            # output (paper Eq. 1):  y = s ⊙ ((W + s_l·B A) x + b0 + b)
            # input (chat-65B):      y = (W + s_l·B A)(s ⊙ x) + b0 + b
        "norm": {(layer_idx, "input_layernorm" | "post_attention_layernorm") | (None, "norm"): Tensor[C]},
            # tuned RMSNorm weight DELTA: w' = w + Δ
        "prompt": {layer_idx: Tensor[K, C]},             # adaption prompt E_l of that layer
        "gate": {layer_idx: Tensor[H]},                  # raw per-head gate g_l (required where a prompt is)
        "gate_activation": "tanh" | "none",              # default "tanh" (V2); "none" = V1 inference / LitGPT
        "gate_scale": {layer_idx: Tensor[1]},            # ν_l, official `new_gate`; default 1
        "prompt_kv_adapted": bool,                       # default False
            # False: kp = W_k P + b0_k,  vp = W_v P + b0_v          (frozen base k_proj/v_proj, multimodal-7B)
            # True:  kp, vp through the adapted k_proj/v_proj bias and scale, never LoRA (chat-65B, LitGPT)
        "visual": {layer_idx: Tensor[B, K, C]},          # per-sample visual tokens V added to that layer's prompt
    }

Gated prompt attention of a prompted layer l (spec §2c), per head h, before o_proj:

    x  = RMSNorm_attn(h)
    q  = RoPE(q_proj'(x)),  k = RoPE(k_proj'(x)),  v = v_proj'(x)          # ' = adapted linear
    o  = softmax(q kᵀ/√d + causal/pad mask) v
    P  = E_l (+ V_l[b])                                                    # (B, K, C)
    kp = k_proj(P),  vp = v_proj(P)                                        # no RoPE, no norm, no LoRA
    o += act(g_l)[h] · ν_l · softmax(q kpᵀ/√d) vp                          # separate softmax, no mask, GQA
    out = o_proj'(o)

Padding: a 2-D `attention_mask` (1 = token, 0 = pad) masks keys; position ids default to cumsum(mask) − 1
clamped at 0, as HF `generate` does for left padding. Fully masked (padded) query rows get a uniform softmax
over a finite large negative score instead of NaN; their values are meaningless and must not be compared.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORM_NAMES = ("input_layernorm", "post_attention_layernorm", "norm")
ADAPTER_KEYS = {
    "linear",
    "scale_side",
    "norm",
    "prompt",
    "gate",
    "gate_activation",
    "gate_scale",
    "prompt_kv_adapted",
    "visual",
}
LINEAR_ENTRY_KEYS = {"bias", "scale", "lora_A", "lora_B", "lora_scaling"}


# ----------------------------------------------------------------------------------------------------------------
# Validation


def _check_adapter(adapter: dict, num_layers: int) -> None:
    unknown = set(adapter) - ADAPTER_KEYS
    if unknown:
        raise ValueError(f"unknown adapter keys {sorted(unknown)}; expected a subset of {sorted(ADAPTER_KEYS)}")
    if adapter.get("scale_side", "output") not in ("output", "input"):
        raise ValueError(f"`scale_side` must be 'output' or 'input', got {adapter['scale_side']!r}")
    if adapter.get("gate_activation", "tanh") not in ("tanh", "none"):
        raise ValueError(f"`gate_activation` must be 'tanh' or 'none', got {adapter['gate_activation']!r}")
    for (layer, name), entry in adapter.get("linear", {}).items():
        if name not in LINEAR_NAMES or not 0 <= layer < num_layers:
            raise ValueError(
                f"bad `linear` key {(layer, name)}; expected (0..{num_layers - 1}, one of {LINEAR_NAMES})"
            )
        if set(entry) - LINEAR_ENTRY_KEYS:
            raise ValueError(
                f"unknown `linear` entry keys {sorted(set(entry) - LINEAR_ENTRY_KEYS)} at {(layer, name)}"
            )
        if (entry.get("lora_A") is None) != (entry.get("lora_B") is None):
            raise ValueError(f"`lora_A` and `lora_B` must be given together, at {(layer, name)}")
    for layer, name in adapter.get("norm", {}):
        if name not in NORM_NAMES or (name == "norm") != (layer is None):
            raise ValueError(f"bad `norm` key {(layer, name)}; use (layer_idx, '<...>_layernorm') or (None, 'norm')")
    prompts = adapter.get("prompt", {})
    for layer in prompts:
        if layer not in adapter.get("gate", {}):
            raise ValueError(f"layer {layer} has a `prompt` but no `gate`; give both")
    for layer in adapter.get("visual", {}):
        if layer not in prompts:
            raise ValueError(f"layer {layer} has `visual` tokens but no `prompt`; V is added to a prompt")


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm(x) = w ⊙ x / √(mean(x²) + ε)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def adapted_linear(
    x: Tensor, weight: Tensor, base_bias: Tensor | None, entry: dict | None, scale_side: str, use_lora: bool = True
) -> Tensor:
    """The V2 linear (spec §2d/e, §8.3).

    output side: y = s ⊙ ((W + s_l·B A) x + b0 + b)        input side: y = (W + s_l·B A)(s ⊙ x) + b0 + b
    Absent s, b, (A, B) mean 1, 0, 0. `use_lora=False` drops the LoRA term (prompt K/V never see LoRA).
    """
    entry = entry or {}
    s, b = entry.get("scale"), entry.get("bias")
    if s is not None and scale_side == "input":
        x = s * x  # s ∈ R^in
    y = x @ weight.T  # W x
    if use_lora and entry.get("lora_A") is not None:
        y = y + entry.get("lora_scaling", 1.0) * ((x @ entry["lora_A"].T) @ entry["lora_B"].T)  # s_l·B A x
    if base_bias is not None:
        y = y + base_bias  # + b0
    if b is not None:
        y = y + b  # + b
    if s is not None and scale_side == "output":
        y = s * y  # s ∈ R^out
    return y


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin (B, T, d) of rotate-half RoPE: θ_i = theta^(−2i/d), angles duplicated over the two halves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (d/2,)
    angles = position_ids[..., None].float() * inv_freq  # (B, T, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, d)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE(x) = x ⊙ cos + rotate_half(x) ⊙ sin, with rotate_half([x1, x2]) = [−x2, x1]; x is (B, heads, T, d)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, heads, T, d/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, heads, T, d)
    return x * cos[:, None] + rotated * sin[:, None]


def split_heads(x: Tensor, head_dim: int) -> Tensor:
    """(B, T, heads·d) → (B, heads, T, d)."""
    b, t, _ = x.shape
    return x.view(b, t, -1, head_dim).transpose(1, 2)


def share_kv_heads(x: Tensor, num_heads: int) -> Tensor:
    """GQA: (B, H_kv, T, d) → (B, H, T, d); query head h reads kv head h // (H / H_kv), as HF `repeat_kv`."""
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def attention_allowed(attention_mask: Tensor | None, batch: int, seq: int) -> Tensor:
    """Boolean (B, 1, T, T): query i may see key j iff j ≤ i and key j is not padding."""
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]  # (1, 1, T, T) causal
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
    return allowed.expand(batch, 1, seq, seq)


def default_position_ids(attention_mask: Tensor | None, batch: int, seq: int) -> Tensor:
    """(B, T): cumsum(mask) − 1 clamped at 0 (left padding), or 0..T−1 without a mask."""
    if attention_mask is None:
        return torch.arange(seq)[None].expand(batch, seq)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _fp32(obj):
    """Detached fp32 copies of every tensor in a nested dict, so bf16/fp16 or trainable adapter tensors work."""
    if isinstance(obj, Tensor):
        return obj.detach().float()
    return {k: _fp32(v) for k, v in obj.items()} if isinstance(obj, dict) else obj


# ----------------------------------------------------------------------------------------------------------------
# Decoder


class _Reference:
    """Holds config, fp32 weights and the adapter while one forward pass runs."""

    def __init__(self, config, weights: dict[str, Tensor], adapter: dict):
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"only the default RoPE is supported, got `rope_type`={rope['rope_type']!r}")
        if config.hidden_act != "silu":
            raise ValueError(f"only SwiGLU (`hidden_act`='silu') is supported, got {config.hidden_act!r}")
        self.theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.w = {k: v.detach().float() for k, v in weights.items()}
        _check_adapter(adapter, self.num_layers)
        self.adapter = _fp32(adapter)
        self.scale_side = adapter.get("scale_side", "output")

    def linear(self, layer: int, module: str, name: str, x: Tensor, use_lora: bool = True) -> Tensor:
        """Adapted `model.layers.{layer}.{module}.{name}` applied to x."""
        prefix = f"model.layers.{layer}.{module}.{name}"
        entry = self.adapter.get("linear", {}).get((layer, name))
        return adapted_linear(
            x, self.w[prefix + ".weight"], self.w.get(prefix + ".bias"), entry, self.scale_side, use_lora
        )

    def norm(self, layer: int | None, name: str, x: Tensor) -> Tensor:
        """RMSNorm with the tuned weight w' = w + Δ."""
        key = "model.norm.weight" if layer is None else f"model.layers.{layer}.{name}.weight"
        weight = self.w[key]
        delta = self.adapter.get("norm", {}).get((layer, name))
        return rms_norm(x, weight if delta is None else weight + delta, self.eps)

    def prompt_term(self, layer: int, q: Tensor) -> Tensor:
        """act(g_l)[h] · ν_l · softmax(q kpᵀ/√d) vp, per head; q is (B, H, T, d), returns (B, H, T, d)."""
        prompt = self.adapter["prompt"][layer]  # (K, C)
        p = prompt.expand(q.shape[0], *prompt.shape)  # (B, K, C)
        if layer in self.adapter.get("visual", {}):
            p = p + self.adapter["visual"][layer]  # (B, K, C): E_l + V[b]
        if self.adapter.get("prompt_kv_adapted", False):
            kp = self.linear(layer, "self_attn", "k_proj", p, use_lora=False)  # (B, K, H_kv·d)
            vp = self.linear(layer, "self_attn", "v_proj", p, use_lora=False)
        else:
            prefix = f"model.layers.{layer}.self_attn."
            kp = adapted_linear(
                p, self.w[prefix + "k_proj.weight"], self.w.get(prefix + "k_proj.bias"), None, "output"
            )
            vp = adapted_linear(
                p, self.w[prefix + "v_proj.weight"], self.w.get(prefix + "v_proj.bias"), None, "output"
            )
        kp = share_kv_heads(split_heads(kp, self.head_dim), self.num_heads)  # (B, H, K, d), no RoPE
        vp = share_kv_heads(split_heads(vp, self.head_dim), self.num_heads)  # (B, H, K, d)
        scores = q @ kp.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, T, K), no mask
        term = scores.softmax(dim=-1) @ vp  # (B, H, T, d)
        gate = self.adapter["gate"][layer].reshape(-1)  # (H,)
        if self.adapter.get("gate_activation", "tanh") == "tanh":
            gate = gate.tanh()
        nu = self.adapter.get("gate_scale", {}).get(layer)
        if nu is not None:
            gate = gate * nu.reshape(())
        return gate[None, :, None, None] * term  # (B, H, T, d)

    def attention(self, layer: int, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor) -> Tensor:
        """o_proj'(softmax(q kᵀ/√d + mask) v [+ gated prompt term]); x is the normed input (B, T, C)."""
        b, t, _ = x.shape
        q = apply_rope(split_heads(self.linear(layer, "self_attn", "q_proj", x), self.head_dim), cos, sin)  # (B,H,T,d)
        k = apply_rope(
            split_heads(self.linear(layer, "self_attn", "k_proj", x), self.head_dim), cos, sin
        )  # (B,Hkv,T,d)
        v = split_heads(self.linear(layer, "self_attn", "v_proj", x), self.head_dim)  # (B, H_kv, T, d)
        k, v = share_kv_heads(k, self.num_heads), share_kv_heads(v, self.num_heads)  # (B, H, T, d)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, T, T)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)  # finite: padded rows stay NaN-free
        o = scores.softmax(dim=-1) @ v  # (B, H, T, d)
        if layer in self.adapter.get("prompt", {}):
            o = o + self.prompt_term(layer, q)  # added BEFORE o_proj
        o = o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # (B, T, H·d)
        return self.linear(layer, "self_attn", "o_proj", o)

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """SwiGLU: down'(silu(gate'(x)) ⊙ up'(x))."""
        hidden = F.silu(self.linear(layer, "mlp", "gate_proj", x)) * self.linear(layer, "mlp", "up_proj", x)
        return self.linear(layer, "mlp", "down_proj", hidden)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None) -> Tensor:
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, b, t)
        cos, sin = rope_cos_sin(position_ids.expand(b, t), self.head_dim, self.theta)  # (B, T, d)
        allowed = attention_allowed(attention_mask, b, t)  # (B, 1, T, T)
        h = self.w["model.embed_tokens.weight"][input_ids]  # (B, T, C)
        for layer in range(self.num_layers):
            h = h + self.attention(layer, self.norm(layer, "input_layernorm", h), cos, sin, allowed)
            h = h + self.mlp(layer, self.norm(layer, "post_attention_layernorm", h))
        h = self.norm(None, "norm", h)
        lm_head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])  # tied when absent
        return h @ lm_head.T  # (B, T, vocab)


@torch.no_grad()
def reference_logits(
    config,
    weights: dict[str, Tensor],
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    adapter: dict | None = None,
    position_ids: Tensor | None = None,
) -> Tensor:
    """fp32 logits (B, T, vocab) of a LLaMA decoder with the V2 adaptations in `adapter` (module docstring).

    Args:
        config: a `transformers.LlamaConfig` (read only).
        weights: `LlamaForCausalLM.state_dict()`-named tensors; cast to fp32.
        input_ids: (B, T) token ids.
        attention_mask: optional (B, T), 1 for tokens and 0 for padding.
        adapter: the adapter dict; None or {} for the plain base model.
        position_ids: optional (B, T) or (1, T); default cumsum(mask) − 1 clamped at 0.
    """
    return _Reference(config, weights, adapter or {}).forward(input_ids, attention_mask, position_ids)


def reference_logits_from_model(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    adapter: dict | None = None,
    position_ids: Tensor | None = None,
) -> Tensor:
    """`reference_logits` with the config and weights of a plain `LlamaForCausalLM` (never its forward)."""
    return reference_logits(model.config, model.state_dict(), input_ids, attention_mask, adapter, position_ids)


# ----------------------------------------------------------------------------------------------------------------
# Visual bridge (spec §3 steps 2–5)


def _layer_norm(x: Tensor, w: dict[str, Tensor], name: str, eps: float) -> Tensor:
    """LayerNorm(x) = γ ⊙ (x − mean) / √(var + ε) + β, biased variance over the last dim."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return w[name + ".weight"] * (x - mean) / torch.sqrt(var + eps) + w[name + ".bias"]


def _affine(x: Tensor, w: dict[str, Tensor], name: str) -> Tensor:
    """y = W x + b."""
    return x @ w[name + ".weight"].T + w[name + ".bias"]


def _vit_block(x: Tensor, w: dict[str, Tensor], prefix: str, num_heads: int, eps: float) -> Tensor:
    """Pre-norm ViT block (timm `Block` names): x += proj(MHSA(LN1 x)); x += fc2(GELU(fc1(LN2 x)))."""
    b, n, c = x.shape
    d = c // num_heads
    qkv = _affine(_layer_norm(x, w, prefix + "norm1", eps), w, prefix + "attn.qkv")  # (B, N, 3C)
    qkv = qkv.view(b, n, 3, num_heads, d).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, d) each
    attn = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(dim=-1)  # (B, heads, N, N), no mask
    o = (attn @ v).transpose(1, 2).reshape(b, n, c)  # (B, N, C)
    x = x + _affine(o, w, prefix + "attn.proj")
    hidden = _affine(_layer_norm(x, w, prefix + "norm2", eps), w, prefix + "mlp.fc1")  # (B, N, ratio·C)
    hidden = 0.5 * hidden * (1.0 + torch.erf(hidden / math.sqrt(2.0)))  # exact (erf) GELU
    return x + _affine(hidden, w, prefix + "mlp.fc2")


@torch.no_grad()
def reference_visual_bridge(
    features: Tensor, weights: dict[str, Tensor], num_heads: int, block_eps: float = 1e-5, norm_eps: float = 1e-5
) -> Tensor:
    """V = LN(visual_proj(first K of blocks([query; LN(clip_proj(features))]))), spec §3 steps 2–5.

    Args:
        features: (B, N, Cv) encoder tokens (CLIP features).
        weights: flat dict: `clip_proj.{weight,bias}` (Cv, Cv), `clip_proj_norm.{weight,bias}` (Cv,),
            `query` (K, Cv), `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}` for
            i = 0..n−1 (a timm `Block` state_dict under `blocks.{i}.`; n is counted from the keys),
            `visual_proj.{weight,bias}` (C, Cv), `visual_proj_norm.{weight,bias}` (C,).
        num_heads: attention heads of each ViT block.
        block_eps: LayerNorm ε inside the blocks. The upstream code builds timm 0.3.2-era `Block`s, whose default
            `norm_layer` was `torch.nn.LayerNorm` (ε = 1e-5); timm 1.0's `Block` defaults to 1e-6.
        norm_eps: ε of `clip_proj_norm` and `visual_proj_norm`, which are `torch.nn.LayerNorm` (default 1e-5).

    Returns:
        V (B, K, C).
    """
    w = {k: v.detach().float() for k, v in weights.items()}
    x = _layer_norm(_affine(features.float(), w, "clip_proj"), w, "clip_proj_norm", norm_eps)  # (B, N, Cv)
    num_queries = w["query"].shape[0]
    x = torch.cat([w["query"].expand(x.shape[0], -1, -1), x], dim=1)  # (B, K + N, Cv), no position embedding
    num_blocks = len({key.split(".")[1] for key in w if key.startswith("blocks.")})
    for i in range(num_blocks):
        x = _vit_block(x, w, f"blocks.{i}.", num_heads, block_eps)
    x = x[:, :num_queries]  # (B, K, Cv)
    return _layer_norm(_affine(x, w, "visual_proj"), w, "visual_proj_norm", norm_eps)  # (B, K, C)
