"""The frozen image encoder that both methods read (DESIGN.md decision 4).

The encoder is named in the adapter config and rebuilt from that name on load; its weights are never written
into an adapter file. Two families are supported:

* timm models by name, e.g. `CLIP_VIT_L14` (the CLIP ViT-L/14 of both papers, with its QuickGELU), built
  with `timm.create_model` and read through `forward_features` / `forward_intermediates`; a model that timm saved
  (`save_for_hf`) by its ``"local-dir:<folder>"`` or ``"hf-hub:<repo>"`` name, e.g. the scene encoder
  (`vision.scene_encoder`);
* transformers vision towers by local path with an ``"hf:"`` prefix (`CLIPVisionModel`,
  `CLIPVisionModelWithProjection`, `SiglipVisionModel`).

Without pretrained weights (tests, benchmarks on a random encoder) the encoder is initialised from a fixed seed,
so an adapter trained on it reloads onto the same encoder.

Two readings are offered, one per paper:

* `tokens(x)`: every token after the final norm and the projection head, (B, N, C_out). LLaMA-Adapter V2 feeds
  all 257 CLIP tokens, `ln_post` and `proj` applied, to its visual bridge (spec `llama_adapter_v2.md` §3.1).
* `prefix_intermediates(x, every)`: the class token after every `every`-th block, no final norm, (B, n, C).
  LaVIN uses the CLS token after blocks 4, 8, …, 24 of ViT-L/14 (spec `lavin_mma.md` §4).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

HF_PREFIX = "hf:"
TIMM_SOURCES = ("local-dir:", "hf-hub:")  # timm names of a saved model: its folder, or its Hub repo
NORMED_LAST_HIDDEN_STATE = ("siglip",)  # transformers towers whose `last_hidden_state` has the final norm already
# OpenAI's CLIP ViT-L/14, the encoder of both papers. timm's QuickGELU variant is the exact one: its plain
# `vit_large_patch14_clip_224.openai` loads the same weights with exact GELU, which moves logits by ~1e-2.
CLIP_VIT_L14 = "vit_large_patch14_clip_quickgelu_224.openai"
IMAGENET_LABEL_SETS = ("in1k", "in12k", "in21k", "in22k")  # in a timm tag: a classifier head, not a projection


def create_vision_model(name: str, pretrained: bool = False, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build the encoder named `name` (a timm model name, or ``"hf:<local path>"`` for a transformers tower)."""
    model_kwargs = dict(model_kwargs or {})
    if name.startswith(HF_PREFIX):
        from transformers import AutoConfig, CLIPVisionModel, CLIPVisionModelWithProjection, SiglipVisionModel

        path = name.removeprefix(HF_PREFIX)
        config = AutoConfig.from_pretrained(path)
        towers = {cls.__name__: cls for cls in (CLIPVisionModel, CLIPVisionModelWithProjection, SiglipVisionModel)}
        by_type = {  # a full CLIP checkpoint ("clip") gives its vision tower and projection
            "clip_vision_model": CLIPVisionModel,
            "clip": CLIPVisionModelWithProjection,
            "siglip_vision_model": SiglipVisionModel,
        }
        saved_as = [towers[a] for a in (getattr(config, "architectures", None) or []) if a in towers]
        tower = saved_as[0] if saved_as else by_type.get(config.model_type)
        if tower is None:
            raise ValueError(
                f"`vision_model`={name!r} has model_type={config.model_type!r}; transformers vision towers of type "
                f"{sorted(by_type)} (or saved as one of {sorted(towers)}) are supported."
            )
        if config.model_type == "clip" and "config" not in model_kwargs:  # the projection width is on the outer config
            model_kwargs["config"] = config.vision_config
            model_kwargs["config"].projection_dim = config.projection_dim
        if torch.empty(()).device.type == "meta":  # a skeleton (counting, conversion): the shapes, no weights
            return tower(model_kwargs.get("config") or AutoConfig.from_pretrained(path))
        return tower.from_pretrained(path, **model_kwargs)
    sourced = name.startswith(TIMM_SOURCES)  # a timm folder or Hub repo that holds its own config and weights
    if not sourced and not timm.is_model(name):
        raise ValueError(
            f"`vision_model`={name!r} is neither a timm model name (or 'local-dir:<folder>', 'hf-hub:<repo>') nor "
            "'hf:<path to a transformers vision tower>'."
        )
    if pretrained and not sourced:  # the local cache when the weights are there, so that no network is asked at all
        overlay = model_kwargs.setdefault("pretrained_cfg_overlay", {})
        if "file" not in overlay:
            overlay["file"] = _cached_timm_weights(name)
    return timm.create_model(name, pretrained=pretrained, **model_kwargs)


def _cached_timm_weights(name: str) -> str | None:
    """The local file of timm model `name`'s pretrained weights in the Hugging Face cache, or None if it is not
    there and the Hub can be reached (timm then downloads it). Raises a `ValueError` at once when it is not there and
    the Hub cannot be reached (offline, or no network), instead of retrying for a minute."""
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(name)
    repo = getattr(config, "hf_hub_id", None)
    if repo is None:
        return None
    for filename in (getattr(config, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename) if filename else None
        if isinstance(found, str):
            return found
    if constants.HF_HUB_OFFLINE or not _hub_reachable():
        raise ValueError(
            f"`vision_pretrained`=True needs the pretrained weights of `vision_model`={name!r} (Hub repo {repo!r}), "
            "which are not in the local Hugging Face cache, and the Hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''}. Fetch them once where there is a "
            f"network (`timm.create_model({name!r}, pretrained=True)`), or pass `vision_pretrained=False` for a "
            "random encoder."
        )
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face Hub opens within `timeout` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class VisionBackbone(nn.Module):
    """A frozen image encoder: `pixel_values` (B, 3, H, W) → features; no parameter is trainable or saved."""

    def __init__(self, name: str, pretrained: bool = False, model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.name = name
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # without pretrained weights, the same name always gives the same encoder
            self.encoder = create_vision_model(name, pretrained, model_kwargs)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.is_timm = not name.startswith(HF_PREFIX)

    def train(self, mode: bool = True) -> VisionBackbone:
        """The encoder stays in eval mode (frozen: no dropout, no drop-path), whatever the mode of its parent.

        Adapters that a method placed inside the encoder (LaVIN's MM-adapters) do follow `mode`: the adapter
        containers of every PEFT tuner layer in it (`adapter_layer_names`, `other_param_names`, e.g. a dropout)
        are set to `mode`, while the wrapped encoder modules stay in eval mode.
        """
        super().train(mode)
        self.encoder.eval()
        for module in self.encoder.modules():
            if isinstance(module, BaseTunerLayer):
                for name in (*module.adapter_layer_names, *module.other_param_names):
                    part = getattr(module, name, None)
                    if isinstance(part, nn.Module):
                        part.train(mode)
        return self

    @property
    def is_vit(self) -> bool:
        """A transformer with a class token (what LaVIN reads); otherwise a convolutional network, or a transformer
        without one (transformers' SigLIP)."""
        if not self.is_timm:
            return getattr(self._hf_root.embeddings, "class_embedding", None) is not None
        return hasattr(self.encoder, "blocks") and getattr(self.encoder, "num_prefix_tokens", 0) > 0

    @property
    def image_size(self) -> int:
        if self.is_timm and hasattr(self.encoder, "patch_embed"):
            return int(self.encoder.patch_embed.img_size[0])
        if self.is_timm:
            return int(self.encoder.pretrained_cfg["input_size"][-1])
        return int(self.encoder.config.image_size)

    @property
    def width(self) -> int:
        """Width C of the block outputs (1024 for ViT-L/14)."""
        if self.is_timm:
            return int(self.encoder.embed_dim)
        return int(self.encoder.config.hidden_size)

    @property
    def depth(self) -> int:
        if self.is_timm:
            return len(self.encoder.blocks)
        return int(self.encoder.config.num_hidden_layers)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, for methods that place adapters inside them."""
        if self.is_timm:
            return self.encoder.blocks
        return self._hf_root.encoder.layers

    @property
    def _hf_root(self) -> nn.Module:
        """The transformers tower's module that holds `embeddings`, `encoder` and `post_layernorm`."""
        return getattr(self.encoder, "vision_model", self.encoder)

    @property
    def token_width(self) -> int:
        """Width C_out of `tokens()` (768 for CLIP ViT-L/14: its projection head; a CNN's channels)."""
        if self.is_timm:
            return self.encoder.head.out_features if self.projects_tokens else int(self.encoder.num_features)
        projection = getattr(self.encoder, "visual_projection", None)
        return projection.out_features if projection is not None else self.width

    @property
    def projects_tokens(self) -> bool:
        """Whether `tokens()` applies a timm transformer's linear `head`: the image projection of a CLIP-style
        image-text tower (OpenAI's, LAION's), not the classifier of weights fine-tuned on an ImageNet label set
        (their pretrained tag names it, e.g. `augreg_in21k_ft_in1k`, `fb_in1k`), whose class scores per token would
        be no features at all."""
        if not (self.is_timm and hasattr(self.encoder, "blocks") and isinstance(self.encoder.head, nn.Linear)):
            return False
        tag = (getattr(self.encoder, "pretrained_cfg", None) or {}).get("tag") or ""
        return not any(label_set in tag for label_set in IMAGENET_LABEL_SETS)

    def check_pixel_values(self, pixel_values: torch.Tensor, batch_size: int | None = None) -> None:
        """Raise `ValueError` unless `pixel_values` is a float (B, 3, S, S) tensor at this encoder's image size."""
        size = self.image_size
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            got = pixel_values.dtype if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"`pixel_values` must be a floating-point tensor (B, 3, {size}, {size}); got {got}.")
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"`pixel_values` must have shape (batch, 3, {size}, {size}) for vision model {self.name!r}; "
                f"got {tuple(pixel_values.shape)}."
            )
        if batch_size is not None and pixel_values.shape[0] != batch_size:
            raise ValueError(
                f"`pixel_values` holds {pixel_values.shape[0]} images for a batch of {batch_size} sequences; "
                "pass one image per sequence."
            )

    def _input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        parameter = next(self.encoder.parameters())
        return pixel_values.to(device=parameter.device, dtype=parameter.dtype)

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Every token after the final norm and projection: (B, N, C_out), e.g. (B, 257, 768) for ViT-L/14; a timm
        transformer with a classifier head gives its features, without the head (`projects_tokens`). A CNN's tokens
        are the positions of its last feature map, (B, H·W, C), before its pooling and classifier."""
        x = self._input(pixel_values)
        if self.is_timm:
            features = self.encoder.forward_features(x)  # a transformer's (B, N, C), final norm applied
            if features.ndim == 4:  # a CNN's map (B, C, H, W) → (B, H·W, C)
                return features.flatten(2).transpose(1, 2)
            return self.encoder.head(features) if self.projects_tokens else features
        output = self.encoder(pixel_values=x)
        features = output.last_hidden_state
        post_norm = getattr(self._hf_root, "post_layernorm", None)
        if post_norm is not None and not self._hf_root.config.model_type.startswith(NORMED_LAST_HIDDEN_STATE):
            features = post_norm(features)  # CLIP's tower norms its pooled token only
        projection = getattr(self.encoder, "visual_projection", None)
        return projection(features) if projection is not None else features

    def prefix_intermediates(self, pixel_values: torch.Tensor, every: int) -> torch.Tensor:
        """The class token after blocks every, 2·every, …: (B, depth // every, C), no final norm."""
        if every < 1 or self.depth % every != 0:
            raise ValueError(f"`every`={every} must divide the vision depth {self.depth}.")
        indices = list(range(every - 1, self.depth, every))
        x = self._input(pixel_values)
        if self.is_timm:
            intermediates = self.encoder.forward_intermediates(
                x, indices=indices, return_prefix_tokens=True, norm=False, output_fmt="NLC", intermediates_only=True
            )
            return torch.stack([prefix[:, 0] for _, prefix in intermediates], dim=1)  # (B, n, C)
        hidden_states = self.encoder(pixel_values=x, output_hidden_states=True).hidden_states
        return torch.stack([hidden_states[i + 1][:, 0] for i in indices], dim=1)  # (B, n, C)
