"""Official LLaMA-Adapter V2 checkpoints → `LlamaAdapterV2Config` adapters (spec `llama_adapter_v2.md` §2, §5, §9).

Two key layouts are read (§2):

* multimodal 7B (BIAS-7B, LORA-BIAS-7B): `llama.layers.{i}.attention.{gate, new_gate, wq.bias, wo.bias,
  lora_w{q,k,v,o}_l{1,2}.weight}`, `llama.layers.{i}.feed_forward.{w1,w2,w3.bias, lora_w{1,2,3}_l{1,2}.weight}`,
  `llama.layers.{i}.{attention_norm,ffn_norm}.weight`, `llama.norm.weight`, `adapter_query.weight`,
  `visual_query.weight`, `visual_blocks.*`, `{clip_proj,clip_proj_norm,visual_proj,visual_proj_norm}.*`;
* chat 65B (bias-scale-norm): `layers.{i}.attention.w{q,k,v,o}_{bias,scale}`,
  `layers.{i}.feed_forward.w{1,2,3}_{bias,scale}`, the norms, no `llama.` prefix; the released model has no prompts
  (if a checkpoint has them, `adapter_query.weight` and gates, their K/V read k/v through the scale and bias:
  `prompt_kv_adapted`; the multimodal ones read the frozen weights only).

Mapping (§9): wq/wk/wv/wo → q/k/v/o_proj, w1 → gate_proj, w3 → up_proj, w2 → down_proj; l1 → LoRA A, l2 → LoRA B
(scaling 1); gate (1, H, 1, 1) → (H,), tanh in the forward; new_gate → `gate_scale`; adapter_query (L·K, C) → the
prompt of layer N − L + j; the official norms are full tuned weights, ours are deltas Δ = w − w_base. Rows acting on
q/k outputs (q/k bias, LoRA B of q/k) are permuted to the HF RoPE layout (`rope.meta_to_hf_rows`).

The preset follows from the keys (scales → CHAT-65B, LoRA → LORA-BIAS-7B, no linear biases → CAPTION-7B, else
BIAS-7B) unless one is given; the
sizes that shapes reveal (K, L, LoRA rank, bridge width and depth) are read from the checkpoint; what they do not
(the bridge's heads, the vision encoder) comes from the preset, and `overrides` change any field last.

Frozen weights are never part of an adapter: a full training state dict's `clip.*` (the CLIP encoder, rebuilt from
the config's `vision_model` at load time) and the base LLaMA's own weights are recognised, left out and counted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ..llama_adapter_v2 import LlamaAdapterV2Config, LlamaAdapterV2Model
from ..llama_adapter_v2.presets import PRESETS
from .adapter_folder import ConversionSummary, Recipe, convert_official
from .checkpoint import BaseModel, ConversionError, OfficialCheckpoint
from .mapping import Convert, Rule, identity
from .rope import meta_to_hf_rows

FAMILY = "LLaMA-Adapter V2"
# official linear → (official module, HF module, HF linear)
LINEARS = {
    "wq": ("attention", "self_attn", "q_proj"),
    "wk": ("attention", "self_attn", "k_proj"),
    "wv": ("attention", "self_attn", "v_proj"),
    "wo": ("attention", "self_attn", "o_proj"),
    "w1": ("feed_forward", "mlp", "gate_proj"),
    "w2": ("feed_forward", "mlp", "down_proj"),
    "w3": ("feed_forward", "mlp", "up_proj"),
}
NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
VISUAL = ("clip_proj", "clip_proj_norm", "visual_query", "visual_blocks", "visual_proj", "visual_proj_norm")
LAYER = "base_model.model.model.layers.{i}"
PROMPT = "base_model.model.model.layers.{layer}.self_attn.o_proj.mma_adapter_v2_prompt.default"
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _prefix(tensors: Mapping[str, torch.Tensor]) -> str:
    """ "llama." for the multimodal layout, "" for the chat-65B one."""
    return "llama." if any(key.startswith("llama.") for key in tensors) else ""


def detect_preset(checkpoint: OfficialCheckpoint) -> str:
    """CHAT-65B when the checkpoint has scales, LORA-BIAS-7B when it has LoRA, CAPTION-7B when it has no linear
    biases (the pre-training phase, §4), else BIAS-7B (§2, §5). The checkpoint's own `w_lora` / `w_bias` flags,
    where present, must agree with its tensors."""
    keys = list(checkpoint.tensors)
    has_lora = any(".lora_w" in key for key in keys)
    has_bias = any(re.search(r"\.w\w+(\.bias|_bias)$", key) for key in keys)
    for flag, present, what in (("w_lora", has_lora, "LoRA tensors"), ("w_bias", has_bias, "linear biases")):
        declared = checkpoint.config.get(flag)
        if declared is not None and bool(declared) != present:
            raise ConversionError(
                f"The checkpoint's config says {flag}={declared}, but it {'has' if present else 'has no'} {what}."
            )
    if any(re.search(r"\.w\w+_scale$", key) for key in keys):
        return "CHAT-65B"
    if has_lora:
        return "LORA-BIAS-7B"
    return "BIAS-7B" if has_bias else "CAPTION-7B"


def _first(tensors: Mapping[str, torch.Tensor], candidates: list[tuple[str, int]]) -> tuple[int, str] | None:
    """(size along `dim`, key) of the first present candidate (key, dim)."""
    return next(((tensors[key].shape[dim], key) for key, dim in candidates if key in tensors), None)


def architecture(checkpoint: OfficialCheckpoint) -> dict[str, tuple[int, str]]:
    """Base config fields the checkpoint implies: field → (value, official key it was read from)."""
    t, p = checkpoint.tensors, _prefix(checkpoint.tensors)
    found: dict[str, tuple[int, str] | None] = {}
    layers = sorted({int(m.group(1)) for key in t if (m := _LAYER_INDEX.search(key))})
    found["num_hidden_layers"] = (layers[-1] + 1, f"{p}layers.{layers[-1]}.*") if layers else None
    found["hidden_size"] = _first(t, [(f"{p}norm.weight", 0), ("adapter_query.weight", 1), ("visual_proj.weight", 0)])
    gate = f"{p}layers.0.attention.gate"
    found["num_attention_heads"] = (t[gate].numel(), gate) if gate in t else None
    ffn = f"{p}layers.0.feed_forward."
    found["intermediate_size"] = _first(
        t, [(ffn + "w1.bias", 0), (ffn + "w1_bias", 0), (ffn + "w2_scale", 0), (ffn + "lora_w1_l2.weight", 0)]
    )
    return {name: value for name, value in found.items() if value is not None}


def build_config(
    checkpoint: OfficialCheckpoint, base: BaseModel, preset: str, overrides: Mapping[str, Any] | None = None
) -> LlamaAdapterV2Config:
    """The preset, with the sizes read from the checkpoint's shapes, then `overrides`."""
    overrides = dict(overrides or {})
    t = checkpoint.tensors
    fields: dict[str, Any] = {}
    lora = next((key for key in t if re.search(r"\.lora_w\w+_l1\.weight$", key)), None)
    if lora is not None:
        fields["r"] = t[lora].shape[0]
    if "visual_query.weight" in t:
        fields["prompt_length"], fields["visual_width"] = t["visual_query.weight"].shape
        blocks = {int(m.group(1)) for key in t if (m := re.match(r"visual_blocks\.(\d+)\.", key))}
        if blocks:
            fields["visual_depth"] = max(blocks) + 1
    if "adapter_query.weight" in t:
        rows = t["adapter_query.weight"].shape[0]
        gates = [key for key in t if re.search(r"(^|\.)layers\.\d+\.attention\.gate$", key)]
        prompted = len(gates)  # a gate per prompted layer
        if gates and len(gates) == base.config.num_hidden_layers:
            # the chat code keeps a gate in every layer and prompts the top L alone: the others' never trained (0)
            prompted = sum(1 for key in gates if t[key].any()) or len(gates)
            if prompted < len(gates):
                fields["gate_layers"] = "all"
        if "prompt_length" not in fields and prompted and rows % prompted == 0:
            fields["prompt_length"] = rows // prompted
        default = fields.get("prompt_length", LlamaAdapterV2Config.from_preset(preset).prompt_length)
        length = overrides.get("prompt_length", default)
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ConversionError(f"`prompt_length` must be a positive integer; got {length!r}.")
        if rows % length:
            raise ConversionError(
                f"`adapter_query.weight` has {rows} rows, not a multiple of the prompt length K={length}; pass the "
                "right `prompt_length`."
            )
        fields["prompt_length"], fields["prompt_layers"] = length, rows // length
    if preset == "CAPTION-7B" and any(re.search(r"(^|\.)(norm|attention_norm|ffn_norm)\.weight$", key) for key in t):
        fields["norm_modules"] = LlamaAdapterV2Config.from_preset("BIAS-7B").norm_modules  # a file with tuned norms
    has_scales = any(re.search(r"\.w\w+_scale$", key) for key in t)
    if has_scales:  # chat 65B: prompts, if any, read k/v through the scale and bias (§2e)
        fields["prompt_kv_adapted"] = True
    try:
        config = LlamaAdapterV2Config.from_preset(preset, **{**fields, **overrides})
    except (TypeError, ValueError) as error:
        raise ConversionError(f"Cannot build the {preset} configuration: {error}") from error
    if has_scales and config.scale_side != "input":
        raise ConversionError(
            f"The checkpoint's scales act on the input side (chat-65B, spec §2e); `scale_side`={config.scale_side!r} "
            "cannot represent them exactly (spec §9 trap 6). Keep `scale_side`='input'."
        )
    return config


def rules(
    checkpoint: OfficialCheckpoint, base: BaseModel, config: LlamaAdapterV2Config, skeleton: object = None
) -> list[Rule]:
    """The official → PEFT rules for this checkpoint's layout (multimodal or chat) on `base`."""
    p = _prefix(checkpoint.tensors)
    head_dim = base.head_dim

    def rows(heads: int) -> Convert:
        return lambda tensor, fields: meta_to_hf_rows(tensor, heads, head_dim, f"layer {fields['i']} q/k tensor")

    permute = {"wq": rows(base.config.num_attention_heads), "wk": rows(base.num_kv_heads)}
    table = []
    for name, (module, hf_module, linear) in LINEARS.items():
        site, target = f"{p}layers.{{i}}.{module}.", f"{LAYER}.{hf_module}.{linear}.mma_adapter_v2_"
        on_rows = permute.get(name, identity)
        table += [
            Rule(site + f"{name}.bias", target + "bias.default", on_rows),
            Rule(site + f"{name}_bias", target + "bias.default", on_rows),
            Rule(site + f"{name}_scale", target + "scale.default"),  # input side: no permutation
            Rule(site + f"lora_{name}_l1.weight", target + "lora_A.default.weight"),
            Rule(site + f"lora_{name}_l2.weight", target + "lora_B.default.weight", on_rows),
        ]
    o_proj = f"{LAYER}.self_attn.o_proj.mma_adapter_v2_"
    table += [
        Rule(f"{p}layers.{{i}}.attention.gate", o_proj + "gate.default", lambda t, f: t.reshape(-1)),
        Rule(f"{p}layers.{{i}}.attention.new_gate", o_proj + "gate_scale.default", lambda t, f: t.reshape(1)),
        Rule("adapter_query.weight", PROMPT, _split_prompts(config, base.config.num_hidden_layers)),
    ]
    table += _norm_rules(p, base)
    table += [Rule(f"{name}.{{rest}}", f"base_model.mma_adapter_v2_visual.default.{name}.{{rest}}") for name in VISUAL]
    return table


def _norm_rules(p: str, base: BaseModel) -> list[Rule]:
    """Official norms are full tuned weights w; ours are Δ = w − w_base (spec §2f), so the base's are read."""
    layers = range(base.config.num_hidden_layers)
    names = [f"model.layers.{i}.{norm}.weight" for i in layers for norm in NORMS.values()] + ["model.norm.weight"]
    weights = base.tensors(names)

    def delta(base_key: str) -> Convert:
        def convert(tensor: torch.Tensor, fields: dict[str, str]) -> torch.Tensor:
            reference = weights[base_key.format(**fields)]
            if tensor.shape != reference.shape:
                raise ConversionError(
                    f"A norm of shape {tuple(tensor.shape)} does not fit the base's {tuple(reference.shape)}."
                )
            return tensor.float() - reference.float()

        return convert

    table = [
        Rule(
            f"{p}layers.{{i}}.{official}.weight",
            f"{LAYER}.{hf}.mma_adapter_v2_norm.default",
            delta(f"model.layers.{{i}}.{hf}.weight"),
        )
        for official, hf in NORMS.items()
    ]
    table.append(
        Rule(f"{p}norm.weight", "base_model.model.model.norm.mma_adapter_v2_norm.default", delta("model.norm.weight"))
    )
    return table


def _split_prompts(config: LlamaAdapterV2Config, num_layers: int) -> Convert:
    """adapter_query (L·K, C), layer-major → the prompt (K, C) of each of the top L layers (spec §2a)."""
    layers = LlamaAdapterV2Model.prompt_layer_ids(config, num_layers)
    length = config.prompt_length

    def split(tensor: torch.Tensor, fields: dict[str, str]) -> dict[str, torch.Tensor]:
        if tensor.ndim != 2 or tensor.shape[0] != len(layers) * length:
            raise ConversionError(
                f"`adapter_query.weight` has shape {tuple(tensor.shape)}; the configuration needs "
                f"{len(layers)} prompted layers × K={length} rows."
            )
        prompts = tensor.reshape(len(layers), length, -1)  # (L, K, C)
        return {PROMPT.format(layer=layer): prompts[j] for j, layer in enumerate(layers)}

    return split


FROZEN = [
    r"clip\..*",  # the CLIP encoder of a full training state dict
    r"(llama\.)?(tok_embeddings|output)\.weight",
    r"(llama\.)?layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight",
]


RECIPE = Recipe(FAMILY, PRESETS, FROZEN, detect_preset, architecture, build_config, rules)


def convert_llama_adapter_v2(checkpoint, base, out, **options) -> ConversionSummary:
    """An official LLaMA-Adapter V2 checkpoint ("BIAS-7B", "LORA-BIAS-7B", "CHAT-65B", …) → a PEFT adapter folder:
    `convert_official` with LLaMA-Adapter V2's recipe (same arguments; the preset is detected from the keys)."""
    return convert_official(RECIPE, checkpoint, base, out, **options)
