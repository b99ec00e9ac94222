"""Synthetic checkpoints in the official key layouts (spec `llama_adapter_v2.md` §2, `lavin_mma.md` §5), at tiny
sizes, with every tensor random and away from its identity init (gates ≠ 0, norms ≠ 1, LoRA B ≠ 0, …), plus a tiny
LLaMA base with weights large enough that the logits are O(1)."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import torch
from conftest import CLIP_VIT_L14, tiny_llama
from safetensors.torch import save_file
from transformers import LlamaConfig

TINY_VIT = dict(img_size=28, patch_size=14, depth=4, embed_dim=32, num_heads=4, num_classes=24)
VISION_MODEL = CLIP_VIT_L14
FEATURES = 24  # width of the tiny encoder's tokens (its projection head), C_f


def parity_base(kind: str = "mha", seed: int = 0):
    """A tiny `LlamaForCausalLM` (C=32, H=4, N=4, F=64, vocab 97) whose logits are O(1): N(0, 1/fan_in) weights."""
    model = tiny_llama(kind, "eager", seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "model.embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=generator))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * p.shape[1] ** -0.5)
    return model


def norms_only_base(directory: Path, **config) -> SimpleNamespace:
    """A Hugging Face LLaMA directory at real sizes holding only `config.json` and the norm weights (all a
    conversion reads), and a stand-in with its `config` for the checkpoint builders."""
    config = LlamaConfig(**config)
    config.save_pretrained(directory)
    names = ("input_layernorm", "post_attention_layernorm")
    norms = {
        f"model.layers.{i}.{n}.weight": torch.ones(config.hidden_size)
        for i in range(config.num_hidden_layers)
        for n in names
    }
    save_file(norms | {"model.norm.weight": torch.ones(config.hidden_size)}, directory / "model.safetensors")
    return SimpleNamespace(config=config)


class _Random:
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator) * std

    def uniform(self, *shape: int, low: float = 0.5, high: float = 1.5) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=self.generator)

    def linear(self, out: int, inp: int) -> torch.Tensor:
        return self.normal(out, inp, std=inp**-0.5)


def llama_adapter_v2(
    layout: str,
    base,
    *,
    prompt_length: int = 3,
    visual_width: int = 16,
    visual_depth: int = 2,
    lora_rank: int = 2,
    chat_prompts: bool | str = False,
    seed: int = 1,
) -> dict:
    """An official V2 checkpoint for `base`: layout "bias" (BIAS-7B), "lora" (LORA-BIAS-7B), "caption" (CAPTION-7B:
    the pre-training phase's gates, prompts and visual path, no biases, no norms, spec §4) or "chat" (chat-65B, with
    `chat_prompts` also prompts and gates in the top N − 1 layers as the chat code allows, spec §2e; with
    `chat_prompts="every layer"` also the zero gate that the chat code keeps in the unprompted layer 0)."""
    config, r = base.config, _Random(seed)
    c, n, f = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = c // heads
    out = {"wq": heads * d, "wk": kv * d, "wv": kv * d, "wo": c, "w1": f, "w2": c, "w3": f}
    inp = {"wq": c, "wk": c, "wv": c, "wo": heads * d, "w1": c, "w2": f, "w3": c}
    module = {name: "attention" if name in ("wq", "wk", "wv", "wo") else "feed_forward" for name in out}
    state = {}
    p = "" if layout == "chat" else "llama."
    for i in range(n):
        for name in out:
            site = f"{p}layers.{i}.{module[name]}."
            if layout == "chat":  # bias and input-side scale on all seven linears (§2e)
                state[site + f"{name}_bias"] = r.normal(out[name], std=0.2)
                state[site + f"{name}_scale"] = r.uniform(inp[name])
            elif name in ("wq", "wo", "w1", "w2", "w3") and layout != "caption":  # multimodal: no k/v bias (§2d)
                state[site + f"{name}.bias"] = r.normal(out[name], std=0.2)
            if layout == "lora":
                state[site + f"lora_{name}_l1.weight"] = r.linear(lora_rank, inp[name])
                state[site + f"lora_{name}_l2.weight"] = r.normal(out[name], lora_rank, std=0.3)
        if layout != "caption":
            state[f"{p}layers.{i}.attention_norm.weight"] = r.uniform(c)
            state[f"{p}layers.{i}.ffn_norm.weight"] = r.uniform(c)
        if layout != "chat" or (chat_prompts and i > 0):
            state[f"{p}layers.{i}.attention.gate"] = r.normal(1, heads, 1, 1)
        elif chat_prompts == "every layer":  # the chat code's gate in every layer: layer 0's never trained
            state[f"{p}layers.{i}.attention.gate"] = torch.zeros(1, heads, 1, 1)
        if layout == "lora":
            state[f"{p}layers.{i}.attention.new_gate"] = r.uniform(1, 1, 1, 1)
    if layout != "caption":
        state[f"{p}norm.weight"] = r.uniform(c)
    if layout != "chat" or chat_prompts:
        state["adapter_query.weight"] = r.normal((n - 1) * prompt_length, c)
    if layout == "chat":
        return {"model": state}
    state["visual_query.weight"] = r.normal(prompt_length, visual_width)
    w = visual_width
    for j in range(visual_depth):
        b = f"visual_blocks.{j}."
        for norm in ("norm1", "norm2"):
            state[b + norm + ".weight"], state[b + norm + ".bias"] = r.uniform(w), r.normal(w, std=0.1)
        shapes = {"attn.qkv": (3 * w, w), "attn.proj": (w, w), "mlp.fc1": (4 * w, w), "mlp.fc2": (w, 4 * w)}
        for name, (o, i) in shapes.items():
            state[b + name + ".weight"], state[b + name + ".bias"] = r.linear(o, i), r.normal(o, std=0.1)
    for name, (o, i) in {"clip_proj": (w, FEATURES), "visual_proj": (c, w)}.items():
        state[name + ".weight"], state[name + ".bias"] = r.linear(o, i), r.normal(o, std=0.1)
    for name, width in {"clip_proj_norm": w, "visual_proj_norm": c}.items():
        state[name + ".weight"], state[name + ".bias"] = r.uniform(width), r.normal(width, std=0.1)
    config = {"w_bias": layout != "caption", "w_lora": layout == "lora", "lora_rank": lora_rank}
    return {"model": state, "config": config}


def lavin(
    base,
    *,
    adapter_dim: int = 8,
    groups: int = 2,
    projector: int = 16,
    vision_width: int = 32,
    vision_depth: int = 4,
    seed: int = 2,
) -> dict:
    """An official LaVIN training checkpoint (`misc.save_model`): DDP `module.` keys, optimizer, args Namespace."""
    r, c, n = _Random(seed), base.config.hidden_size, base.config.num_hidden_layers
    state = {}

    def adapter(site: str, width: int) -> None:
        state[site + ".conv_A.weight"] = r.normal(adapter_dim, width, 1, std=width**-0.5)
        state[site + ".conv_A.bias"] = r.normal(adapter_dim, std=0.1)
        for up in ("conv_B", "conv_D"):
            state[site + f".{up}.weight"] = r.normal(width, adapter_dim // groups, 1, std=0.5)
            state[site + f".{up}.bias"] = r.normal(width, std=0.1)
        state[site + ".expert_weights.weight"] = r.normal(2, width, std=1.0)
        state[site + ".expert_weights.bias"] = r.normal(2, std=0.5)

    for i in range(n):
        adapter(f"layers.{i}.adapter_attn", c)
    for j in range(vision_depth):
        adapter(f"backbone.visual.transformer.resblocks.{j}.adapter_attn", vision_width)
    state["adapter_proj.conv_A.weight"] = r.linear(projector, vision_width)
    state["adapter_proj.conv_A.bias"] = r.normal(projector, std=0.1)
    state["adapter_proj.conv_B.weight"] = r.linear(c, projector)
    state["adapter_proj.conv_B.bias"] = r.normal(c, std=0.1)
    state["adapter_modality_embedding.weight"] = r.normal(2, c, std=2.0)
    optimizer = {"state": {0: {"step": torch.tensor(10.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
    args = argparse.Namespace(
        llm_model="7B", temperature=5.0, adapter_scale=1.0, adapter_type="attn", visual_adapter_type="router"
    )
    model = {"module." + key: value for key, value in state.items()}
    return {"model": model, "optimizer": optimizer, "epoch": 19, "scaler": None, "args": args}
