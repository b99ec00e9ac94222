"""An independent reference in Meta's layout, for the conversion parity tests (tests only; no upstream code).

Written from the equations of `llama_adapter_v2.md` §2–§3 and `lavin_mma.md` §2–§4, in the official checkpoints'
own names and conventions: interleaved (complex) RoPE, `wq/wk/wv/wo/w1/w2/w3`, `attention_norm`/`ffn_norm`, the
official module order, and the raw official adapter tensors (gates (1, H, 1, 1), Conv1d weights, full tuned norm
weights, `adapter_query` as one (L·K, C) table). It reads the base LLaMA as Meta-layout weights, which
`hf_to_meta` makes from a Hugging Face model by undoing the q/k row permutation, written here independently.

Entry points: `hf_to_meta`, `openai_clip_tokens`, `adapter_v2_visual`, `adapter_v2_logits`, `lavin_visual_tokens`,
`lavin_logits`.
Everything runs in float64, so the reference's own rounding is far below the fp32 model's. The fp16 roundings of
the official LaVIN code (routing weights, E_m, CLIP output) are left out, as `LaVINModel` leaves them out (a
documented deviation, `lavin/model.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DTYPE = torch.float64

HF_TO_META = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def hf_to_meta(model) -> dict[str, Tensor]:
    """A plain HF `LlamaForCausalLM`'s weights under Meta names, q/k rows back in interleaved-pair order.

    HF row (head h, half p, index i) holds Meta row (head h, pair i, member p), so Meta = HF viewed (h, 2, d/2)
    and transposed to (h, d/2, 2).
    """
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone().to(DTYPE)
        if key == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = value
        elif key == "lm_head.weight":
            out["output.weight"] = value
        elif key == "model.norm.weight":
            out["norm.weight"] = value
        else:
            layer, rest = key.removeprefix("model.layers.").split(".", 1)
            module, leaf = rest.rsplit(".", 1)
            n = {"self_attn.q_proj": heads, "self_attn.k_proj": kv_heads}.get(module)
            if n is not None:
                value = value.reshape(n, 2, head_dim // 2, -1).transpose(1, 2).reshape(value.shape)
            out[f"layers.{layer}.{HF_TO_META[module]}.{leaf}"] = value
    return out


# ---------------------------------------------------------------------------------------------------- LLaMA (Meta)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """w ⊙ x / √(mean(x²) + ε)."""
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope(x: Tensor, theta: float) -> Tensor:
    """Interleaved RoPE: pairs (x₂ᵢ, x₂ᵢ₊₁) of each head as complex numbers times e^{i·t·θ^(−2i/d)}; x (B, T, H, d)."""
    t, d = x.shape[1], x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    angles = torch.outer(torch.arange(t, dtype=torch.float64), freqs)  # (T, d/2)
    rotation = torch.polar(torch.ones_like(angles), angles)  # (T, d/2), complex128
    pairs = torch.view_as_complex(x.to(DTYPE).reshape(*x.shape[:-1], d // 2, 2))  # (B, T, H, d/2)
    return torch.view_as_real(pairs * rotation[None, :, None]).flatten(-2)  # (B, T, H, d)


class MetaLlama:
    """LLaMA in Meta names, with the official adapters found in `weights` (base and adapter tensors together).

    Linear `p` (e.g. `layers.3.attention.wq`): y = W(s ⊙ x) + b + l2(l1(x)) with s = `p_scale` (chat-65B, input
    side), b = `p.bias` (multimodal) or `p_bias` (chat-65B), l1/l2 = `lora_<name>_l1/_l2` (LoRA, no scaling).
    """

    def __init__(self, weights: dict[str, Tensor], heads: int, kv_heads: int, eps: float, theta: float = 10000.0):
        self.w = {k: v.to(DTYPE) for k, v in weights.items()}
        self.heads, self.kv_heads, self.eps, self.theta = heads, kv_heads, eps, theta
        self.dim = self.w["tok_embeddings.weight"].shape[1]
        self.head_dim = self.dim // heads
        self.layers = 1 + max(int(k.split(".")[1]) for k in self.w if k.startswith("layers."))

    def linear(self, prefix: str, x: Tensor, lora: bool = True) -> Tensor:
        module, name = prefix.rsplit(".", 1)
        scale = self.w.get(prefix + "_scale")
        y = (x * scale if scale is not None else x) @ self.w[prefix + ".weight"].T
        bias = self.w.get(prefix + ".bias", self.w.get(prefix + "_bias"))
        if bias is not None:
            y = y + bias
        l1, l2 = f"{module}.lora_{name}_l1.weight", f"{module}.lora_{name}_l2.weight"
        if lora and l1 in self.w:
            y = y + (x @ self.w[l1].T) @ self.w[l2].T
        return y

    def heads_of(self, x: Tensor) -> Tensor:
        """(B, T, n·d) → (B, n, T, d), kv heads repeated to H (each kv head serves H / H_kv consecutive heads)."""
        b, t, width = x.shape
        x = x.reshape(b, t, width // self.head_dim, self.head_dim).transpose(1, 2)  # (B, n, T, d)
        return x.repeat_interleave(self.heads // x.shape[1], dim=1)  # (B, H, T, d)

    def attention(self, i: int, x: Tensor, mask: Tensor, prompt: Tensor | None, prompt_kv: str) -> Tensor:
        """wo(softmax(q kᵀ/√d + mask) v + tanh(g)·ν·softmax(q k_pᵀ/√d) v_p); x is the normalised input."""
        b, t, _ = x.shape
        a = f"layers.{i}.attention"
        q = rope(self.linear(a + ".wq", x).reshape(b, t, self.heads, self.head_dim), self.theta)  # (B, T, H, d)
        k = rope(self.linear(a + ".wk", x).reshape(b, t, -1, self.head_dim), self.theta)  # (B, T, H_kv, d)
        q, k = q.transpose(1, 2), self.heads_of(k.flatten(2))  # (B, H, T, d)
        v = self.heads_of(self.linear(a + ".wv", x))  # (B, H, T, d)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask  # (B, H, T, T)
        o = scores.softmax(-1) @ v  # (B, H, T, d)
        if prompt is not None:
            if prompt_kv == "frozen":  # multimodal 7B: the layer's own wk / wv weights only (§2c)
                k_p, v_p = prompt @ self.w[a + ".wk.weight"].T, prompt @ self.w[a + ".wv.weight"].T
            else:  # chat-65B: through the scale and bias, never LoRA (§2e)
                k_p, v_p = self.linear(a + ".wk", prompt, lora=False), self.linear(a + ".wv", prompt, lora=False)
            k_p, v_p = self.heads_of(k_p), self.heads_of(v_p)  # (B, H, K, d), no RoPE
            gate = self.w[a + ".gate"].tanh()  # (1, H, 1, 1)
            if a + ".new_gate" in self.w:
                gate = gate * self.w[a + ".new_gate"]
            o = o + gate * (q @ k_p.transpose(-1, -2) / math.sqrt(self.head_dim)).softmax(-1) @ v_p
        return self.linear(a + ".wo", o.transpose(1, 2).reshape(b, t, -1))

    def feed_forward(self, i: int, x: Tensor) -> Tensor:
        f = f"layers.{i}.feed_forward"
        return self.linear(f + ".w2", F.silu(self.linear(f + ".w1", x)) * self.linear(f + ".w3", x))

    def forward(self, h: Tensor, mask: Tensor, prompts=None, mma=None, prompt_kv: str = "frozen") -> Tensor:
        """Logits of the embeddings h (B, T, C); `prompts[i]` (B, K, C) per prompted layer, `mma(i, x)` adapts the
        normalised attention input (LaVIN)."""
        prompts = prompts or {}
        for i in range(self.layers):
            x = rms_norm(h, self.w[f"layers.{i}.attention_norm.weight"], self.eps)
            x = mma(i, x) if mma is not None else x
            h = h + self.attention(i, x, mask, prompts.get(i), prompt_kv)
            h = h + self.feed_forward(i, rms_norm(h, self.w[f"layers.{i}.ffn_norm.weight"], self.eps))
        return rms_norm(h, self.w["norm.weight"], self.eps) @ self.w["output.weight"].T


def causal_mask(t: int) -> Tensor:
    return torch.full((t, t), float("-inf"), dtype=DTYPE).triu(1)


# ---------------------------------------------------------------------------------------------- OpenAI CLIP


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's activation, x · σ(1.702 x) (not the exact GELU of most ViTs)."""
    return x * torch.sigmoid(1.702 * x)


def openai_clip_blocks(encoder, pixels: Tensor, mma=None) -> list[Tensor]:
    """The official OpenAI CLIP vision transformer (`clip/model.py`), written from its definition, in float64 with
    the weights of the timm `encoder` (its modules are not called): the hidden state after each block (B, N, C).

        x = ln_pre([class; conv1(pixels)] + positional)            LayerNorm ε = 1e-5 everywhere
        x = x + out_proj(MHSA(ln_1 x));  x = x + c_proj(QuickGELU(c_fc(ln_2 x)))

    `mma(j, x)` adapts block j's `ln_1` output (LaVIN's MM-adapter); encoder adapters' own weights are skipped.
    """
    w = {k.replace(".base_layer", ""): v.to(DTYPE) for k, v in encoder.state_dict().items() if "mma_" not in k}
    attention = encoder.blocks[0].attn
    heads = getattr(attention, "base_layer", attention).num_heads
    patches = F.conv2d(pixels.to(DTYPE), w["patch_embed.proj.weight"], w.get("patch_embed.proj.bias"), stride=14)
    x = patches.flatten(2).transpose(1, 2)  # (B, N − 1, C)
    x = torch.cat([w["cls_token"].expand(len(x), -1, -1), x], dim=1) + w["pos_embed"]  # (B, N, C)
    x = _layer_norm(x, w, "norm_pre", 1e-5)
    hidden = []
    for j in range(len(encoder.blocks)):
        p = f"blocks.{j}."
        b, n, c = x.shape
        normed = _layer_norm(x, w, p + "norm1", 1e-5)
        normed = mma(j, normed) if mma is not None else normed
        qkv = _affine(normed, w, p + "attn.qkv").reshape(b, n, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, d)
        o = ((q @ k.transpose(-1, -2)) / math.sqrt(c // heads)).softmax(-1) @ v  # (B, heads, N, d)
        x = x + _affine(o.transpose(1, 2).reshape(b, n, c), w, p + "attn.proj")
        x = x + _affine(quick_gelu(_affine(_layer_norm(x, w, p + "norm2", 1e-5), w, p + "mlp.fc1")), w, p + "mlp.fc2")
        hidden.append(x)
    return hidden


def openai_clip_tokens(encoder, pixels: Tensor) -> Tensor:
    """Every token after `ln_post` and the projection `proj` (B, N, C_f), the features LLaMA-Adapter V2 reads."""
    w = {k: v.to(DTYPE) for k, v in encoder.state_dict().items()}
    return _affine(_layer_norm(openai_clip_blocks(encoder, pixels)[-1], w, "norm", 1e-5), w, "head")


# ---------------------------------------------------------------------------------------------- LLaMA-Adapter V2


def _layer_norm(x: Tensor, w: dict[str, Tensor], name: str, eps: float) -> Tensor:
    """γ ⊙ (x − mean) / √(var + ε) + β."""
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    return w[name + ".weight"] * (x - mean) / torch.sqrt(var + eps) + w[name + ".bias"]


def _affine(x: Tensor, w: dict[str, Tensor], name: str) -> Tensor:
    return x @ w[name + ".weight"].T + w[name + ".bias"]


def _vit_block(x: Tensor, w: dict[str, Tensor], p: str, heads: int, eps: float) -> Tensor:
    """Pre-norm ViT block: x += proj(MHSA(LN₁ x)); x += fc2(GELU(fc1(LN₂ x))) (exact GELU)."""
    b, n, c = x.shape
    qkv = _affine(_layer_norm(x, w, p + "norm1", eps), w, p + "attn.qkv").reshape(b, n, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, d)
    o = ((q @ k.transpose(-1, -2)) / math.sqrt(c // heads)).softmax(-1) @ v  # (B, heads, N, d)
    x = x + _affine(o.transpose(1, 2).reshape(b, n, c), w, p + "attn.proj")
    hidden = _affine(_layer_norm(x, w, p + "norm2", eps), w, p + "mlp.fc1")
    return x + _affine(0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2))), w, p + "mlp.fc2")


def adapter_v2_visual(checkpoint: dict[str, Tensor], features: Tensor, heads: int, block_eps: float) -> Tensor:
    """V = LN(visual_proj(blocks([visual_query; LN(clip_proj(F))])[:, :K])), (B, K, C) (spec §3 steps 2–5).

    `block_eps` is the ε of the LayerNorms inside the visual blocks; `clip_proj_norm` and `visual_proj_norm` are
    `torch.nn.LayerNorm` (ε = 1e-5).
    """
    w = {k: v.to(DTYPE) for k, v in checkpoint.items()}
    f = _layer_norm(_affine(features.to(DTYPE), w, "clip_proj"), w, "clip_proj_norm", 1e-5)  # (B, N, Cv)
    query = w["visual_query.weight"]  # (K, Cv)
    x = torch.cat([query.expand(f.shape[0], -1, -1), f], dim=1)  # (B, K + N, Cv)
    depth = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("visual_blocks."))
    for j in range(depth):
        x = _vit_block(x, w, f"visual_blocks.{j}.", heads, block_eps)
    return _layer_norm(_affine(x[:, : query.shape[0]], w, "visual_proj"), w, "visual_proj_norm", 1e-5)


def adapter_v2_logits(
    base: dict[str, Tensor],
    checkpoint: dict[str, Tensor],
    tokens: Tensor,
    visual: Tensor | None,
    prompt_kv: str = "frozen",
    prompt_length: int | None = None,
    **llama,
) -> Tensor:
    """Logits (B, T, V) of the official LLaMA-Adapter V2 forward (§2c, §3.6): the checkpoint's tensors loaded over the
    base (`strict=False`), prompt j = adapter_query[j] (+ V) in layer N − L + j, every prompted layer fed V; K is
    `prompt_length` or the number of visual queries."""
    adapter = {k.removeprefix("llama."): v for k, v in checkpoint.items()}
    model = MetaLlama({**base, **adapter}, **llama)
    prompts = {}
    if "adapter_query.weight" in adapter:
        table = adapter["adapter_query.weight"].to(DTYPE)  # (L·K, C)
        length = prompt_length or adapter["visual_query.weight"].shape[0]
        table = table.reshape(-1, length, table.shape[-1])  # (L, K, C)
        first = model.layers - table.shape[0]
        for j in range(table.shape[0]):
            prompt = table[j].expand(tokens.shape[0], -1, -1)  # (B, K, C)
            prompts[first + j] = prompt + visual if visual is not None else prompt
    h = model.w["tok_embeddings.weight"][tokens]  # (B, T, C)
    return model.forward(h, causal_mask(tokens.shape[1]), prompts=prompts, prompt_kv=prompt_kv)


# ---------------------------------------------------------------------------------------------------------- LaVIN


def _mma(w: dict[str, Tensor], site: str, x: Tensor, weights: Tensor, scale: float) -> Tensor:
    """x + s·w₀·conv_B(z) + s·w₁·conv_D(z), z = conv_A(x): the official 1×1 Conv1d ops on (B, C, N) (§2)."""
    xc = x.transpose(1, 2)  # (B, C, N)
    groups = w[site + ".conv_A.weight"].shape[0] // w[site + ".conv_B.weight"].shape[1]
    z = F.conv1d(xc, w[site + ".conv_A.weight"], w[site + ".conv_A.bias"])  # (B, h, N)
    up0 = F.conv1d(z, w[site + ".conv_B.weight"], w[site + ".conv_B.bias"], groups=groups)  # (B, C, N)
    up1 = F.conv1d(z, w[site + ".conv_D.weight"], w[site + ".conv_D.bias"], groups=groups)
    return (up0 * scale * weights[..., 0, None, None] + up1 * scale * weights[..., 1, None, None] + xc).transpose(1, 2)


def _route(w: dict[str, Tensor], site: str, t: Tensor, tau: float) -> Tensor:
    """softmax((W_m t + b_m) / τ)."""
    return torch.softmax(_affine(t, w, site + ".expert_weights") / tau, dim=-1)


def lavin_visual_tokens(checkpoint, encoder, pixels: Tensor, every: int, tau: float, scale: float = 1.0) -> Tensor:
    """P(CLS after every k-th block) of the official CLIP (`openai_clip_blocks`) with an MM-adapter on each block's
    `ln_1` output (§4), (B, n, C). Routing is the official one: per token position, from batch element 0 (LND
    layout), broadcast to every image."""
    w = {k.removeprefix("module."): v.to(DTYPE) for k, v in checkpoint.items()}

    def mma(j: int, x: Tensor) -> Tensor:
        site = f"backbone.visual.transformer.resblocks.{j}.adapter_attn"
        lnd = x.transpose(0, 1)  # (N, B, Cv): the official blocks run sequence-first
        weights = _route(w, site, lnd[:, 0], tau)  # (N, 2): "x[:, 0]" is image 0 at every token position
        return _mma(w, site, lnd, weights, scale).transpose(0, 1)  # (B, N, Cv)

    hidden = openai_clip_blocks(encoder, pixels, mma)
    features = torch.stack([h[:, 0] for h in hidden[every - 1 :: every]], dim=1)  # (B, n, Cv), no final norm
    hidden = F.silu(_affine(features, w, "adapter_proj.conv_A"))
    return _affine(hidden, w, "adapter_proj.conv_B")


def lavin_logits(base, checkpoint, embeds: Tensor, modality: int, tau: float, scale: float = 1.0, **llama) -> Tensor:
    """Logits at the text positions (B, S, V) of the official sequence [E_m[modality]; embeds] (§3, §4): every
    layer's MM-adapter routes the whole sample from its own input at position 0, which only itself attends to."""
    w = {k.removeprefix("module."): v.to(DTYPE) for k, v in checkpoint.items()}
    model = MetaLlama(base, **llama)
    b, s, _ = embeds.shape
    h = torch.cat([w["adapter_modality_embedding.weight"][modality].expand(b, 1, -1), embeds.to(DTYPE)], dim=1)
    mask = causal_mask(1 + s)
    mask[1:, 0] = float("-inf")  # nobody but the modality token itself attends to position 0

    def mma(i: int, x: Tensor) -> Tensor:
        site = f"layers.{i}.adapter_attn"
        return _mma(w, site, x, _route(w, site, x[:, 0], tau), scale)  # (B, 2) per sample

    return model.forward(h, mask, mma=mma)[:, 1:]
