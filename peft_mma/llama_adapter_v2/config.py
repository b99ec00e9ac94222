"""Configuration of LLaMA-Adapter V2 (Gao et al. 2023, "LLaMA-Adapter V2: Parameter-Efficient Visual Instruction
Model", https://arxiv.org/abs/2304.15010). Equations and the paper-vs-code differences: spec `llama_adapter_v2.md`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig

from ..card import MMAConfigMixin
from ..registry import MMA_ADAPTER_V2

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORM_NAMES = ("input_layernorm", "post_attention_layernorm", "norm")


@dataclass
class LlamaAdapterV2Config(MMAConfigMixin, PeftConfig):
    """
    Configuration for [`LlamaAdapterV2Model`]. The defaults follow the paper; `LlamaAdapterV2Config.from_preset(name)`
    reproduces the released checkpoint families (spec §2, §8).

    Args:
        bias_modules (`list[str]`): Linears that get a zero-init bias `b` (spec §2d/e). Paper: all seven.
        scale_modules (`list[str]`): Linears that get a one-init scale `s` (paper Eq. 1). Multimodal 7B: none.
        scale_side (`Literal["output", "input"]`): `"output"`: y = s ⊙ (W x + b) as in the paper and LitGPT;
            `"input"`: y = W (s ⊙ x) + b as the chat-65B model (spec §2e, §8.3).
        lora_modules (`list[str]`): Linears that also get LoRA `B A` (LORA-BIAS-7B: all seven, spec §2g).
        r (`int`): LoRA rank (PEFT's name; `lora_rank`, the name before, is accepted for one release).
        lora_alpha (`float`, *optional*): LoRA scaling is alpha / r; `None` means 1 (the official code has none).
        norm_modules (`list[str]`): RMSNorms whose weight is tuned (every layer norm and the final norm, spec §2f).
        prompt_length (`int`): Adaption prompt length K per prompted layer (spec §2a).
        prompt_layers (`int`, *optional*): Number L of prompted layers counted from the top; `None` prompts every
            layer but the first (the official N − 1); `0` switches prompts off.
        gate_activation (`Literal["tanh"]`, *optional*): The per-head zero-init gate g enters as tanh(g) (V2, spec
            §2b) or, with `None`, as g itself (V1 inference, LitGPT, PEFT's AdaptionPrompt).
        gate_layers (`Literal["prompted", "all"]`): `"all"` also keeps a (never used) gate in unprompted layers,
            as the official checkpoints store one in layer 0 (spec §5 counts it).
        prompt_gate_scale (`bool`): Adds the official LoRA checkpoints' one-init `new_gate` ν that multiplies the
            gated prompt term in every gated layer.
        prompt_kv_adapted (`bool`): Prompt keys/values go through k_proj/v_proj with this adapter's bias and scale
            (chat-65B, LitGPT) instead of the frozen base weights only (multimodal 7B); never through LoRA (§9 trap 2).
        vision_model (`str`, *optional*): Frozen image encoder: a timm name or "hf:<path>"; `None` is text-only.
        vision_pretrained (`bool`): Load the encoder's pretrained weights (timm's cache) when it is built; an
            "hf:<path>" tower is a saved model and always loads its weights.
        vision_model_kwargs (`dict`, *optional*): Extra keyword arguments for the encoder's constructor.
        visual_width (`int`): Width of the visual bridge (768 for the official model, spec §3).
        visual_depth (`int`): Number of ViT blocks in the bridge (8).
        visual_heads (`int`): Attention heads of the bridge blocks (16).
        visual_fusion (`Literal["early", "all"]`): Which prompted layers get the visual tokens added to their
            prompts: the lowest `early_fusion_layers` (paper §4.2) or all of them (official code, spec §3.6).
        early_fusion_layers (`int`): How many of the lowest prompted layers `"early"` fusion feeds.
        zero_image_for_text (`bool`): Text-only input still adds the visual tokens of an all-zero image, as the
            official training data does (spec §3.7); otherwise text-only input adds none.
        base_hidden_size (`int`, *optional*): Filled at injection; checked when the adapter is loaded again.
        base_num_layers (`int`, *optional*): Filled at injection; checked when the adapter is loaded again.
        init_weights (`bool`): `False` draws random non-identity weights (tests of merging and loading).
        task_type (`str`): Always "CAUSAL_LM": `get_peft_model` then returns a `PeftModelForCausalLM`, whose
            `forward` and `generate` hand `pixel_values` / `has_image` to this tuner.
        target_modules (`list[str]`, *optional*): Restrict the adapted modules to these names (from the linears and
            norms above); `None` adapts every module the other fields name. Prompts need `o_proj`.
    """

    bias_modules: list[str] = field(default_factory=lambda: list(LINEAR_NAMES), metadata={"help": "Linears with b."})
    scale_modules: list[str] = field(default_factory=lambda: list(LINEAR_NAMES), metadata={"help": "Linears with s."})
    scale_side: Literal["output", "input"] = field(default="output", metadata={"help": "Where s multiplies."})
    lora_modules: list[str] = field(default_factory=list, metadata={"help": "Linears with LoRA."})
    r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; None gives scaling 1."})
    norm_modules: list[str] = field(default_factory=lambda: list(NORM_NAMES), metadata={"help": "Tuned norms."})
    prompt_length: int = field(default=10, metadata={"help": "Prompt tokens K per prompted layer."})
    prompt_layers: int | None = field(default=None, metadata={"help": "Prompted layers from the top."})
    gate_activation: Literal["tanh"] | None = field(default="tanh", metadata={"help": "Gate nonlinearity."})
    gate_layers: Literal["prompted", "all"] = field(default="prompted", metadata={"help": "Layers with a gate."})
    prompt_gate_scale: bool = field(default=False, metadata={"help": "Add the official `new_gate`."})
    prompt_kv_adapted: bool = field(default=False, metadata={"help": "Prompt K/V see bias and scale."})
    vision_model: str | None = field(default=None, metadata={"help": "timm name or 'hf:<path>'."})
    vision_pretrained: bool = field(default=True, metadata={"help": "Load the encoder's weights."})
    vision_model_kwargs: dict[str, Any] | None = field(default=None, metadata={"help": "Encoder kwargs."})
    visual_width: int = field(default=768, metadata={"help": "Bridge width."})
    visual_depth: int = field(default=8, metadata={"help": "Bridge blocks."})
    visual_heads: int = field(default=16, metadata={"help": "Bridge heads."})
    visual_fusion: Literal["early", "all"] = field(default="early", metadata={"help": "Fused prompted layers."})
    early_fusion_layers: int = field(default=1, metadata={"help": "Layers fed by early fusion."})
    zero_image_for_text: bool = field(default=False, metadata={"help": "Text input uses a zero image."})
    base_hidden_size: int | None = field(default=None, metadata={"help": "Set at injection."})
    base_num_layers: int | None = field(default=None, metadata={"help": "Set at injection."})
    init_weights: bool = field(default=True, metadata={"help": "False: random non-identity init."})
    task_type: str | None = field(default="CAUSAL_LM", metadata={"help": "Always CAUSAL_LM."})
    target_modules: list[str] | None = field(default=None, metadata={"help": "Names of the modules to adapt."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra trained modules."})
    lora_rank: int | None = field(default=None, metadata={"help": "Deprecated: use `r`."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MMA_ADAPTER_V2
        self._take_deprecated_names()
        if self.task_type != "CAUSAL_LM":
            raise ValueError(
                f"`task_type`={self.task_type!r}; LLaMA-Adapter V2 adapts causal LMs: use 'CAUSAL_LM' (the default), "
                "which makes `get_peft_model` return a `PeftModelForCausalLM` that passes `pixel_values` through."
            )
        for name in ("bias_modules", "scale_modules", "lora_modules"):
            unknown = sorted(set(getattr(self, name)) - set(LINEAR_NAMES))
            if unknown:
                raise ValueError(f"`{name}` has unknown linears {unknown}; choose from {list(LINEAR_NAMES)}.")
        unknown = sorted(set(self.norm_modules) - set(NORM_NAMES))
        if unknown:
            raise ValueError(f"`norm_modules` has unknown norms {unknown}; choose from {list(NORM_NAMES)}.")
        choices = {
            "scale_side": ("output", "input"),
            "gate_activation": ("tanh", None),
            "gate_layers": ("prompted", "all"),
            "visual_fusion": ("early", "all"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}`={getattr(self, name)!r}; expected one of {list(allowed)}.")
        positive = {"prompt_length": self.prompt_length, "r": self.r}
        positive |= {"visual_width": self.visual_width, "visual_depth": self.visual_depth}
        positive |= {"visual_heads": self.visual_heads, "early_fusion_layers": self.early_fusion_layers}
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}`={value!r}; expected a positive integer.")
        layers = self.prompt_layers
        if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool) or layers < 0):
            raise ValueError(f"`prompt_layers`={self.prompt_layers!r}; expected None or an integer >= 0.")
        if self.visual_width % self.visual_heads:
            raise ValueError(
                f"`visual_width`={self.visual_width} is not divisible by `visual_heads`={self.visual_heads}."
            )
        if self.vision_model is not None and self.prompt_layers == 0:
            raise ValueError("`vision_model` needs prompts to carry the visual tokens; set `prompt_layers` > 0.")
        if self.zero_image_for_text and self.vision_model is None:
            raise ValueError("`zero_image_for_text`=True needs a `vision_model`.")
        self._check_target_modules()

    def _take_deprecated_names(self) -> None:
        """`lora_rank` → `r` and `gate_activation="none"` → None, with a FutureWarning (accepted for one release)."""
        if self.lora_rank is not None:
            warnings.warn("`lora_rank` is deprecated; use `r`, PEFT's name.", FutureWarning, stacklevel=3)
            self.r, self.lora_rank = self.lora_rank, None
        if self.gate_activation == "none":
            warnings.warn('`gate_activation="none"` is deprecated; use None.', FutureWarning, stacklevel=3)
            self.gate_activation = None

    def _check_target_modules(self) -> None:
        if self.target_modules is None:
            return
        if isinstance(self.target_modules, str):
            raise ValueError(
                f"`target_modules`={self.target_modules!r}: LLaMA-Adapter V2 takes a list of module names from "
                f"{list(LINEAR_NAMES + NORM_NAMES)}, not a pattern."
            )
        self.target_modules = list(self.target_modules)
        unknown = sorted(set(self.target_modules) - set(LINEAR_NAMES + NORM_NAMES))
        if unknown:
            raise ValueError(
                f"`target_modules` has unknown modules {unknown}; choose from {list(LINEAR_NAMES + NORM_NAMES)}."
            )
        if self.prompt_layers != 0 and "o_proj" not in self.target_modules:
            raise ValueError(
                "`target_modules` leaves out `o_proj`, where the adaption prompts and gates live; add it or set "
                "`prompt_layers=0`."
            )

    @property
    def lora_scaling(self) -> float:
        return 1.0 if self.lora_alpha is None else self.lora_alpha / self.r

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaAdapterV2Config:
        """A config that reproduces a released checkpoint family; see `presets.PRESETS` for the names."""
        from .presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"Unknown LLaMA-Adapter V2 preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LlamaAdapterV2Config:
        """Deprecated name of `from_preset` (as `LaVINConfig.from_preset`), kept for one release."""
        warnings.warn("`LlamaAdapterV2Config.preset` is deprecated; use `from_preset`.", FutureWarning, stacklevel=2)
        return cls.from_preset(name, **overrides)
