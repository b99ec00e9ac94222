"""Configuration of LaVIN's Mixture-of-Modality Adaptation (MMA).

Paper: "Cheap and Quick: Efficient Vision-Language Instruction Tuning for Large Language Models",
Luo et al., NeurIPS 2023, https://arxiv.org/abs/2305.15023. Facts cited as `lavin_mma.md` §n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig

from ..card import MMAConfigMixin
from ..registry import MMA_LAVIN
from .presets import PRESETS

PLACEMENTS = ("attn", "block")
IMAGE_TOKEN_POSITIONS = ("after_bos", "placeholder")
MODALITIES = ("text", "image")
ROUTERS = ("learnt", "modality")


@dataclass
class LaVINConfig(MMAConfigMixin, PeftConfig):
    """Configuration of a [`LaVINModel`]: MM-adapters in a LLaMA decoder, and optionally a vision bridge.

    Args:
        target_modules (`list[str]` or `str`, *optional*):
            The modules whose (normalised) input the MM-adapter adapts. Defaults to `["self_attn"]` (placement
            `"attn"`: the adapter sits between `input_layernorm` and q/k/v), plus `"mlp"` for placement `"block"`.
            Only these two names are supported.
        layers_to_transform (`list[int]` or `int`, *optional*):
            Indices of the decoder layers that get an adapter; all layers when `None` (the official code).
        layers_pattern (`list[str]` or `str`, *optional*):
            The name of the `nn.ModuleList` that `layers_to_transform` indexes (PEFT's usual meaning).
        exclude_modules (`list[str]` or `str`, *optional*):
            Module names to leave untouched.
        modules_to_save (`list[str]`, *optional*):
            Extra base modules to train and save in full (PEFT's usual meaning).
        adapter_dim (`int`):
            Hidden width h of the MM-adapter (8 in every official script, `lavin_mma.md` §2).
        adapter_groups (`int`):
            Groups g of the block-diagonal up-projections (2 officially); must divide `adapter_dim` and the width.
        adapter_scale (`float`):
            The scale s in `out = x + s·w0·(B z + b) + s·w1·(D z + d)` (1 officially).
        adapter_dropout (`float`):
            Dropout on the hidden activation z (0.1 officially).
        adapter_bias (`bool`):
            Give the up-projections their biases b and d (True, as the official code and its 3.8M parameters do).
            False drops them (b = d = 0): the adapter can then no longer add one learnt vector to every token's
            attention input, which is where most of the prose loss of tuning on narrow text comes from (README,
            Benchmarks: "Is it the text half?"). Official checkpoints need True.
        temperature (`float`):
            τ in `w = softmax(router(t)/τ)`: 10 for LaVIN-7B, 5 for LaVIN-13B and the chatbot (§2).
        router (`str`):
            How the decoder's adapters weigh their two up-paths. `"learnt"` (the official code, §3): a router per
            adapter reads the modality token E_m[m] in front of every sequence, `w = softmax(router(t)/τ)`.
            `"modality"` (not in the official code): `w = (1, 0)` for a text-only sample and `(0, 1)` for one with
            an image, so text-only samples use up-path B alone and image samples D alone, and neither trains the
            other's path; there is then no router, no modality embedding and no token in front. The official router
            starts at w ≈ (½, ½) for both modalities (τ = 10), so both paths get the same updates and tuning on
            images changes text-only outputs as much as image ones (README, Benchmarks: "Does the router separate
            the modalities?"). Identity at init either way; the encoder's adapters keep their per-token routers.
            Needs `adapter_placement="attn"`.
        adapter_placement (`str`):
            `"attn"`: one adapter on the normalised attention input (every official script). `"block"`: a second
            one on the normalised FFN input, routed from its own input as in official training (§2, §3).
        vision_model (`str`, *optional*):
            Frozen image encoder (a timm name or `"hf:<path>"`); `None` builds a text-only adapter. LaVIN uses
            OpenAI's CLIP ViT-L/14, `vision.backbone.CLIP_VIT_L14` (timm's QuickGELU variant, §4).
        vision_pretrained (`bool`):
            Load the encoder's pretrained weights through timm (needs the weights cached or a network). An
            `"hf:<path>"` tower is a saved model and always loads its weights.
        vision_model_kwargs (`dict`, *optional*):
            Extra keyword arguments for the encoder constructor (tests build tiny ViTs this way).
        vision_feature_every (`int`):
            The visual tokens are the class token after every k-th encoder block, no final norm: k=4 gives blocks
            4, 8, …, 24 of ViT-L/14, i.e. 6 tokens (§4). Must divide the encoder depth.
        vision_adapters (`bool`):
            Put MM-adapters on `norm1` of every encoder block, routed per token from each image's own tokens (the
            official code keys them on batch element 0, §4; ours does not couple images).
        projector_hidden (`int`):
            Hidden width of the projector Linear→SiLU→Linear from the encoder width to the LLM width (128, §4).
        projector_init_scale (`float`):
            Gain of the projector's output layer W₂ at init: its xavier-uniform weights times this (1, the official
            init). With the official init the visual tokens start at several times the norm of the LLM's text
            embeddings (SmolLM2 with the scene encoder: 10–19 against 3.2); 0.25 brings them to the text's scale.
            Measured there, that did not learn faster (README, "Teach SmolLM2 to see"), so 1 stays the default.
            Only the init changes: a loaded checkpoint keeps its weights.
        image_token_id (`int`, *optional*):
            The placeholder id that marks an image's visual-token positions in `input_ids` (n copies per image; the
            model writes the visual tokens there). `None`: the base's `vocab_size`, outside the vocabulary so that no
            text token can collide with it; filled in when the adapter is attached, and saved.
        num_image_tokens (`int`, *optional*):
            n, the visual tokens per image: the encoder depth / `vision_feature_every`. Filled in when attached.
        image_token_position (`str`):
            Where `peft_mma.data.ImageTokens` (and the collator) put an image's placeholders: `"after_bos"` (right
            after the leading BOS, the official `[BOS, V, text…]`) or `"placeholder"` (in place of one
            `image_token_id` the sample holds; the collator's prompts mark it with `"<image>"`).
        base_num_layers (`int`, *optional*): Filled when attached; checked when the adapter is loaded again.
        base_hidden_size (`int`, *optional*): Filled when attached; checked when the adapter is loaded again.
        merge_modality (`str`):
            Which modality's routing `merge_and_unload` folds into q/k/v by default: `"text"` or `"image"`.
        init_weights (`bool`):
            `True`: the official init, identity at start (up-projections zero). `False`: random non-zero
            up-projections, for tests.
        task_type (`str`):
            Always `"CAUSAL_LM"`: `get_peft_model` then returns a `PeftModelForCausalLM`, whose `forward` and
            `generate` hand `pixel_values` / `has_image` to [`LaVINModel`].
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules whose input is adapted; derived from `adapter_placement` if None."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Decoder layer indices to adapt; all when None."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list that `layers_to_transform` indexes."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Module names to skip."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Base modules to train in full."})
    adapter_dim: int = field(default=8, metadata={"help": "MM-adapter hidden width h."})
    adapter_groups: int = field(default=2, metadata={"help": "Groups of the block-diagonal up-projections."})
    adapter_scale: float = field(default=1.0, metadata={"help": "Adapter scale s."})
    adapter_dropout: float = field(default=0.1, metadata={"help": "Dropout probability on the adapter hidden z."})
    adapter_bias: bool = field(default=True, metadata={"help": "Up-projection biases b, d (official: True)."})
    temperature: float = field(default=10.0, metadata={"help": "Router softmax temperature τ."})
    router: str = field(
        default="learnt", metadata={"help": "'learnt' (official: routed from the modality token) or 'modality'."}
    )
    adapter_placement: str = field(default="attn", metadata={"help": "'attn' or 'block'."})
    vision_model: str | None = field(default=None, metadata={"help": "Frozen image encoder name; None = text only."})
    vision_pretrained: bool = field(default=True, metadata={"help": "Load pretrained encoder weights."})
    vision_model_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Keyword arguments for the encoder constructor."}
    )
    vision_feature_every: int = field(default=4, metadata={"help": "Take the class token after every k-th block."})
    vision_adapters: bool = field(default=True, metadata={"help": "MM-adapters inside the encoder blocks."})
    projector_hidden: int = field(default=128, metadata={"help": "Hidden width of the visual projector."})
    projector_init_scale: float = field(
        default=1.0, metadata={"help": "Gain of the projector's output weights at init (1: official xavier)."}
    )
    image_token_id: int | None = field(default=None, metadata={"help": "Image placeholder id; None: vocab_size."})
    num_image_tokens: int | None = field(
        default=None, metadata={"help": "Visual tokens per image; set when attached."}
    )
    image_token_position: str = field(default="after_bos", metadata={"help": "'after_bos' or 'placeholder'."})
    merge_modality: str = field(default="text", metadata={"help": "Modality folded by `merge_and_unload`."})
    init_weights: bool = field(default=True, metadata={"help": "Identity init (True) or random (False)."})
    base_num_layers: int | None = field(default=None, metadata={"help": "Set when attached."})
    base_hidden_size: int | None = field(default=None, metadata={"help": "Set when attached."})
    task_type: str | None = field(default="CAUSAL_LM", metadata={"help": "Always CAUSAL_LM."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MMA_LAVIN
        if self.task_type != "CAUSAL_LM":
            raise ValueError(
                f"`task_type`={self.task_type!r}; LaVIN adapts causal LMs: use 'CAUSAL_LM' (the default), which makes "
                "`get_peft_model` return a `PeftModelForCausalLM` that passes `pixel_values` and `has_image` through."
            )
        if self.adapter_placement not in PLACEMENTS:
            raise ValueError(f"`adapter_placement`={self.adapter_placement!r} is not one of {PLACEMENTS}.")
        if self.router not in ROUTERS:
            raise ValueError(f"`router`={self.router!r} is not one of {ROUTERS}.")
        if self.router == "modality" and self.adapter_placement != "attn":
            raise ValueError(
                "`router='modality'` needs `adapter_placement='attn'`: the FFN adapters of placement 'block' are "
                "called without the call's modality flags. Use router='learnt' with 'block'."
            )
        if self.target_modules is None:
            names = ["self_attn"] + (["mlp"] if self.adapter_placement == "block" else [])
            self.target_modules = names
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
        targets = self.target_modules if isinstance(self.target_modules, list) else [str(self.target_modules)]
        if self.router == "modality" and any("mlp" in target for target in targets):
            raise ValueError(
                f"`router='modality'` adapts the attention inputs only, and `target_modules`={self.target_modules!r} "
                "names the MLP, whose adapters are called without the call's modality flags. Leave `target_modules` "
                "at its default, or use router='learnt'."
            )
        self._check_positive("adapter_dim", "adapter_groups", "projector_hidden", "vision_feature_every")
        if self.adapter_dim % self.adapter_groups:
            raise ValueError(
                f"`adapter_groups`={self.adapter_groups} must divide `adapter_dim`={self.adapter_dim}; "
                "use e.g. adapter_dim=8 with adapter_groups=2."
            )
        if not self.projector_init_scale > 0:
            raise ValueError(
                f"`projector_init_scale` must be > 0 (1: the official xavier init); got {self.projector_init_scale}."
            )
        if not isinstance(self.adapter_scale, (int, float)) or not math.isfinite(self.adapter_scale):
            raise ValueError(f"`adapter_scale` must be a finite number (1 for LaVIN-7B); got {self.adapter_scale!r}.")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0 (10 for LaVIN-7B, 5 for 13B); got {self.temperature}.")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"`adapter_dropout` must be in [0, 1); got {self.adapter_dropout}.")
        if self.image_token_position not in IMAGE_TOKEN_POSITIONS:
            raise ValueError(
                f"`image_token_position`={self.image_token_position!r} is not one of {IMAGE_TOKEN_POSITIONS}."
            )
        token_id = self.image_token_id
        if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0):
            raise ValueError(f"`image_token_id` must be a token id >= 0 (or None); got {token_id!r}.")
        if self.merge_modality not in MODALITIES:
            raise ValueError(f"`merge_modality`={self.merge_modality!r} is not one of {MODALITIES}.")

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")

    @property
    def has_vision(self) -> bool:
        return self.vision_model is not None

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LaVINConfig:
        """The released configuration `name` (`"lavin-7b"` or `"lavin-13b"`, §5, §6), with `overrides` applied."""
        if name not in PRESETS:
            raise ValueError(f"Unknown LaVIN preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})
