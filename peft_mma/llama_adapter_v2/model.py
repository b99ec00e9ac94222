"""LLaMA-Adapter V2 tuner (Gao et al. 2023, https://arxiv.org/abs/2304.15010; spec `llama_adapter_v2.md`).

One PEFT type whose tuner dispatches on module kind (DESIGN decision 1): linear → `Linear` (bias/scale/LoRA),
`o_proj` → `OutputProjection` (also the layer's prompt and gate), RMSNorm → `Norm`. The visual path (frozen
`VisionBackbone` + trainable `AdapterV2VisualBridge`) is model-level state on the tuner, keyed by adapter name.
Per call, the tuner's `forward` / `generate` (which `PeftModelForCausalLM` calls) turn `pixel_values` into visual
tokens V once (once per `generate`) and hand them, with a prompt K/V cache, to the attention layers as the forward
keyword `attention.STATE_KWARG`.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.integrations import skip_init_on_device
from torch import nn

from ..attention import STATE_KWARG, install_mma_attention, state_handed_to, uninstall_mma_attention
from ..tuner_utils import (
    BACKBONE_ATTR,
    MMATunerMixin,
    check_base_size,
    config_kept_on_error,
    fill_for_base,
    unused_image_side_zero,
)
from ..utils import check_has_image, check_supported_model, declare_merged_biases
from ..vision.backbone import VisionBackbone
from ..vision.bridge import AdapterV2VisualBridge
from .config import LINEAR_NAMES, NORM_NAMES, LlamaAdapterV2Config
from .layer import PREFIX, Linear, LlamaAdapterV2Layer, Norm, OutputProjection

_LAYER_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")
_LAYER_NORM = re.compile(r"(?:^|\.)layers\.(\d+)\.(input_layernorm|post_attention_layernorm)$")
_FINAL_NORM = re.compile(r"(?:^|\.)model\.(norm)$")


def call_inputs(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A call's `input_ids` or `inputs_embeds` (keyword or first positional argument): (B, S[, C])."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]):
        if isinstance(value, torch.Tensor):
            return value
    return None


def positions_from_mask(attention_mask, inputs: torch.Tensor | None) -> torch.Tensor | None:
    """Position ids (B, S) of the S new tokens counted from each row's first unmasked token of a 2-D mask over the
    cached and new tokens, as `generate` counts them: a row's positions do not depend on its left padding (the
    padding itself gets 0). Rows without left padding keep LLaMA's own positions. None where there is no 2-D mask
    or the number of new tokens is unknown."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2 or inputs is None:
        return None
    length, total = inputs.shape[1], attention_mask.shape[1]
    if total < length:
        return None
    left = (attention_mask.long().cumsum(-1) == 0).sum(-1, keepdim=True)  # (B, 1): padding before the first token
    positions = torch.arange(total, device=attention_mask.device)[None] - left
    return positions.clamp(min=0)[:, -length:]


@dataclass
class PromptState:
    """What one forward or `generate` call hands to the prompted attention layers."""

    visual: dict[str, torch.Tensor] = field(default_factory=dict)  # adapter → V, (B or 1, K, C)
    cache: dict = field(default_factory=dict)  # (layer, adapter) → (k_p, v_p), filled only without grad
    unrecorded: dict = field(default_factory=dict)  # adapter → layers that read a V with a graph, recording none


def _parse_key(key: str) -> tuple[int | None, str] | None:
    """`model.layers.3.self_attn.q_proj` → (3, "q_proj"); `model.norm` → (None, "norm"); else None."""
    for pattern in (_LAYER_MODULE, _LAYER_NORM):
        match = pattern.search(key)
        if match:
            return int(match.group(1)), match.group(2)
    return (None, "norm") if _FINAL_NORM.search(key) else None


class LlamaAdapterV2Model(MMATunerMixin, BaseTuner):
    """Injects LLaMA-Adapter V2 into a `LlamaForCausalLM`; see `LlamaAdapterV2Config` for the options."""

    prefix = PREFIX
    tuner_layer_cls = LlamaAdapterV2Layer
    target_module_mapping = {"llama": list(LINEAR_NAMES + NORM_NAMES)}

    # ---- configuration checks (before anything is changed) -------------------------------------------------

    @staticmethod
    def prompt_layer_ids(config: LlamaAdapterV2Config, num_layers: int) -> list[int]:
        """The top L layers: L = `prompt_layers`, or N − 1 when it is `None` (spec §2a)."""
        count = max(num_layers - 1, 0) if config.prompt_layers is None else config.prompt_layers
        return list(range(num_layers - count, num_layers))

    def _check_against_model(self, config: LlamaAdapterV2Config, model: nn.Module) -> None:
        check_supported_model(model)
        num_layers, width = model.config.num_hidden_layers, model.config.hidden_size
        check_base_size(config, model)
        if config.prompt_layers is not None and config.prompt_layers > num_layers:
            raise ValueError(
                f"`prompt_layers`={config.prompt_layers} exceeds the model's {num_layers} decoder layers; pass at "
                f"most {num_layers}."
            )
        prompted = len(self.prompt_layer_ids(config, num_layers))
        if config.vision_model is not None and prompted == 0:
            raise ValueError("`vision_model` needs prompted layers to carry the visual tokens; the model has none.")
        if (
            config.vision_model is not None
            and config.visual_fusion == "early"
            and config.early_fusion_layers > prompted
        ):
            raise ValueError(
                f"`early_fusion_layers`={config.early_fusion_layers} exceeds the {prompted} prompted layers."
            )
        fill_for_base(config, base_num_layers=num_layers, base_hidden_size=width)

    def _check_target_module_exists(self, config: LlamaAdapterV2Config, key: str) -> bool:
        parsed = _parse_key(key)
        if parsed is None:
            return False
        layer, name = parsed
        if config.target_modules is not None and name not in config.target_modules:
            return False
        if name in NORM_NAMES:
            return name in config.norm_modules
        has_prompts = bool(self.prompt_layer_ids(config, config.base_num_layers))
        gated = name == "o_proj" and has_prompts
        return gated or name in (*config.bias_modules, *config.scale_modules, *config.lora_modules)

    # ---- injection -----------------------------------------------------------------------------------------

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        # the checks fill in `base_*`, which a failed injection must not keep
        with config_kept_on_error(config), self.others_trainability_kept():
            self._check_against_model(config, model)
            self._add_visual_path(adapter_name, config, model)
            try:
                super().inject_adapter(model, adapter_name, **kwargs)
            except Exception:
                self._delete_model_level_adapter(adapter_name)
                raise
        if self.prompt_layer_ids(config, config.base_num_layers):
            install_mma_attention(model)
        model.add_model_tags(["peft_mma", "llama-adapter-v2"])  # PEFT's model card names the plugin and the method

    @skip_init_on_device  # under `low_cpu_mem_usage` too: the frozen encoder is not in the adapter file
    def _add_visual_path(self, adapter_name: str, config: LlamaAdapterV2Config, model: nn.Module) -> None:
        """Build the frozen encoder and the trainable bridge of `adapter_name` on the model's device."""
        if "mma_adapter_v2_visual" not in self._modules:
            self.mma_adapter_v2_visual = nn.ModuleDict()
            setattr(self, BACKBONE_ATTR, nn.ModuleDict())
        if config.vision_model is None:
            return
        reference = next(model.parameters())
        on_meta = reference.device.type == "meta"
        with torch.device("meta") if on_meta else nullcontext():
            backbone = VisionBackbone(
                config.vision_model, config.vision_pretrained and not on_meta, config.vision_model_kwargs
            )
        bridge = AdapterV2VisualBridge(
            backbone.token_width,
            model.config.hidden_size,
            config.prompt_length,
            config.visual_width,
            config.visual_depth,
            config.visual_heads,
            device=reference.device,
            dtype=torch.float32,
        )
        dtype = reference.dtype if reference.is_floating_point() else torch.float32
        getattr(self, BACKBONE_ATTR)[adapter_name] = backbone.to(device=reference.device, dtype=dtype)
        self.mma_adapter_v2_visual[adapter_name] = bridge.requires_grad_(not config.inference_mode)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        layer, name = _parse_key(current_key)
        if isinstance(target, LlamaAdapterV2Layer):
            new = None
        elif name in NORM_NAMES:
            new = Norm(target, adapter_name)
        elif name == "o_proj":
            new = OutputProjection(target, adapter_name, self.model.config.num_attention_heads)
        else:
            new = Linear(target, adapter_name)
        module = target if new is None else new
        roles = self._prompt_roles(config, layer) if layer is not None else {}
        if name == "o_proj":
            module.update_layer(adapter_name, config, name, **roles)
        elif name in ("k_proj", "v_proj") and roles["prompted"]:
            path = "adapted" if config.prompt_kv_adapted else "base"
            module.update_layer(adapter_name, config, name, prompt_path=path)
        else:
            module.update_layer(adapter_name, config, name)
        if new is not None:
            if adapter_name not in self.active_adapters:
                new.requires_grad_(False)
            self._replace_module(parent, target_name, new, target)

    def _prompt_roles(self, config: LlamaAdapterV2Config, layer: int) -> dict[str, bool]:
        """Is layer `layer` prompted, gated, fed the visual tokens?"""
        ids = self.prompt_layer_ids(config, config.base_num_layers)
        fused = ids if config.visual_fusion == "all" else ids[: config.early_fusion_layers]
        gated = bool(ids) and (layer in ids or config.gate_layers == "all")
        has_vision = config.vision_model is not None
        return dict(prompted=layer in ids, gated=gated, visual_fused=has_vision and layer in fused)

    def _keep_mma_attention(self) -> bool:
        """Wrap the attention again where the user switched it (`set_attn_implementation`) after the prompts were
        attached: the gated prompt term lives in the wrapper (no-op otherwise). Whether any adapter has prompts."""
        prompted = any(self.prompt_layer_ids(config, config.base_num_layers) for config in self.peft_config.values())
        if prompted:
            install_mma_attention(self.model)
        return prompted

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self._check_adapter_names(adapter_name)
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        active = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name, bridge in getattr(self, "mma_adapter_v2_visual", {}).items():
            bridge.requires_grad_(name in active and not inference_mode)

    # ---- forward and generate ------------------------------------------------------------------------------

    def forward(self, *args, pixel_values=None, has_image=None, **kwargs):
        """The base model's forward, with the per-call prompt state (visual tokens V, K/V cache) handed down.

        The prompts have no position, but the queries that read them are rotated (spec §2c), so a prompted layer's
        output depends on each token's absolute position. Without `position_ids`, positions are counted from each
        row's first unmasked token of a 2-D `attention_mask`, as `generate` counts them: a left-padded row gives
        the logits it gives alone.
        """
        prompted = self._keep_mma_attention()
        state = PromptState(self._visual_tokens(pixel_values, has_image, self._batch_size(args, kwargs)))
        if prompted and kwargs.get("position_ids") is None and len(args) <= 1:
            kwargs["position_ids"] = positions_from_mask(kwargs.get("attention_mask"), call_inputs(args, kwargs))
        return self.model(*args, **kwargs, **{STATE_KWARG: state})

    def generate(self, *args, pixel_values=None, has_image=None, **kwargs):
        """The base model's `generate`; V and the prompt K/V are computed once for all its decoding steps."""
        self._keep_mma_attention()
        state = PromptState(self._visual_tokens(pixel_values, has_image, self._batch_size(args, kwargs)))
        with state_handed_to([self.model], state):
            return self.model.generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args, pixel_values=None, has_image=None, **kwargs) -> dict:
        """The base model's, keeping `pixel_values` and `has_image` at every step. transformers hands images to the
        prefill only, but V2 adds the visual tokens V to the prompts of every step, so a decoding loop written on
        this method (PEFT's `PeftModelForCausalLM.prepare_inputs_for_generation` calls it) needs them each time;
        its forward then encodes them again at each step. Our `generate` computes V once and does not use this."""
        inputs = self.model.prepare_inputs_for_generation(*args, **kwargs)
        if pixel_values is not None:
            inputs["pixel_values"] = pixel_values
        if has_image is not None:
            inputs["has_image"] = has_image
        return inputs

    @staticmethod
    def _batch_size(args: tuple, kwargs: dict) -> int | None:
        inputs = call_inputs(args, kwargs)
        return None if inputs is None else inputs.shape[0]

    def _visual_tokens(self, pixel_values, has_image, batch_size: int | None) -> dict[str, torch.Tensor]:
        """V per active adapter with a visual path: bridge(encoder(images)), (B, K, C); zero-image V (1, K, C) for
        text-only input where `zero_image_for_text`; samples with `has_image` False get the text-only V (or 0)."""
        visual = {}
        bridges = getattr(self, "mma_adapter_v2_visual", {})
        if pixel_values is not None and not any(a in bridges for a in self.active_adapters):
            raise ValueError(
                "`pixel_values` were passed, but no active adapter has a visual path; set `vision_model` in the "
                "adapter config to use images."
            )
        if has_image is not None:
            check_has_image(has_image, batch_size if batch_size is not None else len(has_image))
            if pixel_values is None and bool(has_image.any()):
                raise ValueError(
                    "`has_image` marks samples with images but no `pixel_values` were passed. (The HF `Trainer` drops "
                    "them unless `TrainingArguments(remove_unused_columns=False)`.)"
                )
        for adapter in self.active_adapters:
            if adapter not in bridges:
                continue
            config, backbone, bridge = (
                self.peft_config[adapter],
                getattr(self, BACKBONE_ATTR)[adapter],
                bridges[adapter],
            )
            text_v = None
            if config.zero_image_for_text:
                size = backbone.image_size
                with torch.no_grad():
                    zero_features = backbone.tokens(torch.zeros(1, 3, size, size))
                text_v = bridge(zero_features)  # (1, K, C)
            if pixel_values is None:
                if text_v is not None:
                    visual[adapter] = text_v
                elif (zero := unused_image_side_zero([bridge])) is not None:
                    visual[adapter] = zero  # under DDP: the bridge is used, and the prompts get + 0
                continue
            backbone.check_pixel_values(pixel_values, batch_size)
            with torch.no_grad():
                features = backbone.tokens(pixel_values)  # (B, N, C_f)
            v = bridge(features)  # (B, K, C)
            if has_image is not None:
                keep = has_image.to(device=v.device, dtype=v.dtype).view(-1, 1, 1)
                v = keep * v + (1 - keep) * (text_v if text_v is not None else 0)
            visual[adapter] = v
        return visual

    # ---- merging -------------------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's `merge_adapter`, refused (nothing merged) where a scale to fold has a zero entry: the merged row
        or column of W would be 0, which `unmerge_adapter` cannot divide back. `merge_and_unload`, which is not
        undone, folds such scales."""
        self._check_adapter_names(adapter_names)
        names = adapter_names or self.active_adapters
        for key, module in self.model.named_modules():
            for name in names if isinstance(module, Linear) and not module.merged else ():
                scale = module.mma_adapter_v2_scale[name] if name in module.mma_adapter_v2_scale else None
                if scale is not None and not bool(scale.all()):
                    raise ValueError(
                        f"Adapter {name!r} scales `{key}` by 0 in some entries; merging would lose those weights, "
                        "so `unmerge_adapter` could not restore them. Use `merge_and_unload()`, which is final."
                    )
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Fold bias, scale, LoRA and norms into the base weights and return the plain `LlamaForCausalLM`.

        Prompts and gates cannot be folded (spec §9 "Merging"); use `merge_adapter()` to fold the rest and keep them.
        Another adapter's prompts go with the unload, so a prompted layer's k_proj / v_proj fold too (`_foldable`
        keeps them apart only for prompts that stay).
        """
        self._check_adapter_names(adapter_names)
        names = adapter_names or self.active_adapters
        for name in names:
            config = self.peft_config[name]
            if self.prompt_layer_ids(config, config.base_num_layers) or config.vision_model is not None:
                raise ValueError(
                    f"Adapter {name!r} has adaption prompts, which cannot be merged into the base weights. Use "
                    "`merge_adapter()` to fold bias, scale, LoRA and norms and keep the prompts, or configure "
                    "`prompt_layers=0` (and no `vision_model`) for a fully mergeable adapter."
                )
        paths = {module: dict(module.prompt_path) for module in self.model.modules() if isinstance(module, Linear)}
        for module in paths:
            module.prompt_path.clear()
        try:
            model = super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=names)
        except BaseException:
            for module, path in paths.items():
                module.prompt_path.update(path)
            raise
        self._finish_unload(model)
        return model

    def unload(self) -> nn.Module:
        model = super().unload()
        self._finish_unload(model)
        return model

    @staticmethod
    def _finish_unload(model: nn.Module) -> None:
        """Restore the attention implementation and declare the biases a merge created."""
        uninstall_mma_attention(model)
        declare_merged_biases(model)
