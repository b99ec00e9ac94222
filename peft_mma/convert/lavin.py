"""Official LaVIN checkpoints → `LaVINConfig` adapters (spec `lavin_mma.md` §2, §4, §5, §9).

The official checkpoint (`misc.save_model`) holds every parameter whose name contains "adapter", under `model`,
possibly with a DDP `module.` prefix, next to the optimizer state and the training `args` (an argparse.Namespace):

    layers.{i}.adapter_attn.{conv_A,conv_B,conv_D,expert_weights}.{weight,bias}     MM-adapter before attention
    layers.{i}.adapter_mlp.…                                                          placement "block" only
    backbone.visual.transformer.resblocks.{j}.adapter_attn.…                          MM-adapters inside CLIP
    adapter_proj.{conv_A,conv_B}.{weight,bias}                                        projector C_v → 128 → C
    adapter_modality_embedding.weight                                                 E_m (2, C)

Mapping: conv_A (h, C, 1) → `mma_lavin_down` (h, C); conv_B / conv_D (C, h/g, 1), groups g → `mma_lavin_up0` /
`mma_lavin_up1` (g, C/g, h/g), the same block-diagonal matrix; expert_weights → `mma_lavin_router`; the projector's
conv_A / conv_B (plain Linears) → `mma_lavin_proj_in` / `mma_lavin_proj_out`; E_m → `mma_lavin_modality`. The
adapters act on normalised hidden states, never on q/k outputs, so no RoPE permutation is needed (§9c).

Sizes (h, g, projector width, placement, whether there is a vision path) come from the shapes; the temperature and
scale from the checkpoint's `args` when it has them, else from the preset (lavin-7b: τ = 10, lavin-13b: τ = 5),
chosen by `args.llm_model` or the width. Known deviations of `LaVINModel` from the official code (no fp16 rounding
of the routing weights, no coupling of images across a batch in the encoder) are documented in `lavin/model.py`;
with one image per batch the encoder's routing is the official one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from peft import PeftModel

from ..lavin import LaVINConfig
from ..lavin.presets import PRESETS
from .adapter_folder import ConversionSummary, Recipe, convert_official
from .checkpoint import BaseModel, ConversionError, OfficialCheckpoint
from .mapping import Convert, Rule, identity

FAMILY = "LaVIN"
PARTS = {"conv_A": "mma_lavin_down", "conv_B": "mma_lavin_up0", "conv_D": "mma_lavin_up1"}
VISUAL_SITE = "backbone.visual.transformer.resblocks.{j}.adapter_attn"
PRESET_BY_MODEL = {"7B": "lavin-7b", "13B": "lavin-13b"}
PRESET_BY_WIDTH = {4096: "lavin-7b", 5120: "lavin-13b"}
FROZEN = [
    r"backbone\.(?!.*adapter_).*",  # the CLIP encoder's own weights
    r"(tok_embeddings|output|norm)\.weight",
    r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123]|attention_norm|ffn_norm)\.weight",
]


def _conv_weight(groups: int) -> Convert:
    """Conv1d(k=1) weight (out, in/groups, 1) → Linear (out, in), or → grouped (g, out/g, in/g) when groups > 1."""

    def convert(tensor: torch.Tensor, fields: dict[str, str]) -> torch.Tensor:
        if tensor.ndim != 3 or tensor.shape[-1] != 1:
            raise ConversionError(f"Expected a Conv1d weight of kernel size 1, got shape {tuple(tensor.shape)}.")
        weight = tensor[..., 0]  # (out, in/g)
        if groups == 1:
            return weight.contiguous()
        return weight.reshape(groups, weight.shape[0] // groups, weight.shape[1]).contiguous()  # (g, out/g, in/g)

    return convert


def detect_preset(checkpoint: OfficialCheckpoint) -> str:
    """`args.llm_model` (7B / 13B), else the LLM width (4096 / 5120)."""
    model = checkpoint.args.get("llm_model")
    if model in PRESET_BY_MODEL:
        return PRESET_BY_MODEL[model]
    embedding = checkpoint.tensors.get("adapter_modality_embedding.weight")
    width = embedding.shape[-1] if embedding is not None else None
    if width in PRESET_BY_WIDTH:
        return PRESET_BY_WIDTH[width]
    raise ConversionError(
        f"Cannot tell the LaVIN preset (no `args.llm_model`, width {width}); pass one of {sorted(PRESETS)}."
    )


def architecture(checkpoint: OfficialCheckpoint) -> dict[str, tuple[int, str]]:
    """Base config fields the checkpoint implies: field → (value, official key it was read from)."""
    t, found = checkpoint.tensors, {}
    layers = sorted({int(m.group(1)) for key in t if (m := re.match(r"layers\.(\d+)\.", key))})
    if layers:
        found["num_hidden_layers"] = (layers[-1] + 1, f"layers.{layers[-1]}.*")
    for key, dim in (("adapter_modality_embedding.weight", 1), ("layers.0.adapter_attn.conv_A.weight", 1)):
        if key in t:
            found["hidden_size"] = (t[key].shape[dim], key)
            break
    return found


def build_config(
    checkpoint: OfficialCheckpoint, base: BaseModel, preset: str, overrides: Mapping[str, Any] | None = None
) -> LaVINConfig:
    """The preset, with the sizes read from the shapes and τ, s from the training `args`, then `overrides`."""
    t, args, fields = checkpoint.tensors, checkpoint.args, {}
    visual = _check_visual_adapters(checkpoint)
    down = t.get("layers.0.adapter_attn.conv_A.weight")
    up = t.get("layers.0.adapter_attn.conv_B.weight")
    if down is not None:
        fields["adapter_dim"] = down.shape[0]
        if up is not None and up.ndim == 3 and up.shape[1] and down.shape[0] % up.shape[1] == 0:
            fields["adapter_groups"] = down.shape[0] // up.shape[1]
    fields["adapter_placement"] = "block" if any(re.match(r"layers\.\d+\.adapter_mlp\.", k) for k in t) else "attn"
    if "adapter_proj.conv_A.weight" in t:
        fields["projector_hidden"] = t["adapter_proj.conv_A.weight"].shape[0]
        fields["vision_adapters"] = bool(visual)
    elif not visual:
        fields["vision_model"] = None  # a text-only checkpoint
    for name in ("temperature", "adapter_scale"):
        if name in args:
            fields[name] = float(args[name])
    try:
        return LaVINConfig.from_preset(preset, **{**fields, **(overrides or {})})
    except (TypeError, ValueError) as error:
        raise ConversionError(f"Cannot build the {preset} configuration: {error}") from error


def _check_visual_adapters(checkpoint: OfficialCheckpoint) -> list[str]:
    """The keys of the CLIP adapters, refused unless they are the router adapters before attention (§2, §4)."""
    visual = [key for key in checkpoint.tensors if key.startswith("backbone.") and ".adapter_" in key]
    kind = checkpoint.args.get("visual_adapter_type")
    if kind == "router_block" or any(".adapter_mlp." in key for key in visual):
        raise ConversionError(
            "The checkpoint has MM-adapters before the CLIP blocks' MLPs (`visual_adapter_type='router_block'`); "
            "LaVINConfig puts encoder adapters before attention only, so they have no counterpart."
        )
    if kind not in (None, "router") or (visual and not any(".conv_D." in key for key in visual)):
        raise ConversionError(
            "The checkpoint's CLIP adapters are the plain `RepAdapter` (`visual_adapter_type='normal'`), which drops "
            "the residual and has no router (spec §2 bug); it has no counterpart in LaVINConfig. Only router "
            "adapters (`--visual_adapter_type router`, every released script) convert."
        )
    return visual


def rules(checkpoint: OfficialCheckpoint, base: BaseModel, config: LaVINConfig, skeleton: PeftModel) -> list[Rule]:
    """The official → PEFT rules; the encoder's block path is read from the adapter built for it."""
    groups = config.adapter_groups
    sites = {
        "layers.{i}.adapter_attn": "base_model.model.model.layers.{i}.self_attn",
        "layers.{i}.adapter_mlp": "base_model.model.model.layers.{i}.mlp",
    }
    if config.vision_model is not None and config.vision_adapters:
        sites[VISUAL_SITE] = _visual_blocks(skeleton)
    table = []
    for site, target in sites.items():
        for part, ours in PARTS.items():
            weight = _conv_weight(1 if part == "conv_A" else groups)
            table.append(Rule(f"{site}.{part}.weight", f"{target}.{ours}.default.weight", weight))
            table.append(Rule(f"{site}.{part}.bias", f"{target}.{ours}.default.bias"))
        table.append(Rule(f"{site}.expert_weights.{{rest}}", f"{target}.mma_lavin_router.default.{{rest}}"))
    table += [
        Rule("adapter_proj.conv_A.{rest}", "base_model.mma_lavin_proj_in.default.{rest}"),
        Rule("adapter_proj.conv_B.{rest}", "base_model.mma_lavin_proj_out.default.{rest}"),
        Rule("adapter_modality_embedding.weight", "base_model.mma_lavin_modality.default", identity),
    ]
    return table


def _visual_blocks(skeleton: PeftModel) -> str:
    """`base_model.mma_lavin_visual.default.encoder.blocks.{j}.attn` for a timm encoder (another path for HF)."""
    backbone = skeleton.base_model.mma_lavin_visual["default"]
    names = {module: name for name, module in skeleton.named_modules()}
    blocks = names[backbone.blocks]
    attn = "attn" if hasattr(backbone.blocks[0], "attn") else "self_attn"
    return f"{blocks}.{{j}}.{attn}"


RECIPE = Recipe(FAMILY, PRESETS, FROZEN, detect_preset, architecture, build_config, rules)


def convert_lavin(checkpoint, base, out, **options) -> ConversionSummary:
    """An official LaVIN checkpoint ("lavin-7b", "lavin-13b") → a PEFT adapter folder: `convert_official` with
    LaVIN's recipe (same arguments; the preset comes from `args.llm_model` or the width)."""
    return convert_official(RECIPE, checkpoint, base, out, **options)
