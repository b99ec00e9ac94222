"""LaVIN's Mixture-of-Modality Adaptation as a PEFT tuner (DESIGN.md decisions 3, 4; `lavin_mma.md`).

Paper: "Cheap and Quick: Efficient Vision-Language Instruction Tuning for Large Language Models",
https://arxiv.org/abs/2305.15023.

Per call (`PeftModel.forward` / `generate`), a forward pre-hook on the LLaMA model
  1. encodes `pixel_values` once (frozen `VisionBackbone` with MM-adapters in its blocks, then the projector
     `P = Linear → SiLU → Linear`) and splices the visual tokens into the input (`lavin.sequence`);
  2. computes the router weights per sample from its modality (0 text, 1 image) with the side pass of
     `peft_mma.router`, once per call when gradients are off, on every forward when they are on;
  3. passes them down as the `lavin_routing` kwarg, which reaches every `self_attn` (and is replayed by gradient
     checkpointing when it recomputes a layer).

Usage::

    model = get_peft_model(llama, LaVINConfig.from_preset("lavin-7b"))
    out = model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=images, image_mask=has_image)
    model.generate(input_ids=ids, attention_mask=mask, pixel_values=images, image_mask=has_image, max_new_tokens=64)
    llama_merged = model.merge_and_unload(modality="text")   # or "image"; default: `config.merge_modality`

* `pixel_values` (B, 3, H, W) float, one row per sequence; `image_mask` (B,) bool marks the rows that really have
  an image (default: all). Rows of text-only samples are ignored (zeros are fine); those samples get no visual
  tokens and are routed as text. Without `pixel_values` every sample is text.
* Visual tokens make image samples n tokens longer; mixed batches are re-padded as described in `lavin.sequence`
  (left when the batch is left-padded or when generating, else right). `generate` returns the original prompt ids
  followed by the new tokens; the visual tokens are not part of the returned ids.
* With adapters disabled (`disable_adapter()`), images are ignored and the base model runs unchanged.
* One LaVIN adapter may be active at a time (the side pass routes with one modality embedding).

Known deviations from the official code: images do not couple across the batch (§4 layout bug not reproduced);
the routing weights are not rounded to fp16 (§9); adapters inside the frozen encoder run without dropout, because
`VisionBackbone` keeps the encoder in eval mode.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from peft.peft_model import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..registry import MMA_LAVIN, register
from ..router import modality_side_pass
from ..tuner_utils import MMATunerMixin
from ..utils import check_supported_model
from ..vision.backbone import VisionBackbone
from .config import LaVINConfig
from .layer import LaVINLayer, MMAdapter
from .sequence import insert_visual_tokens, positions

CONSUMERS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
SPECIAL_FORWARD_ARGS = ("pixel_values", "image_mask")


@dataclass
class _Call:
    """What one `PeftModel.forward`/`generate` call passed, and what is cached for its later decoding steps."""

    pixel_values: torch.Tensor | None = None
    has_image: torch.Tensor | None = None  # (B,) bool
    visual: torch.Tensor | None = None  # (B, n, C) projected visual tokens
    routing: dict[str, torch.Tensor] | None = None  # lavin_key → (2 modalities, 2) weights
    per_sample: tuple[int, dict] | None = None  # (batch, the weights per sample handed down), without grad
    prefix_mask: torch.Tensor | None = None  # (B, T) attention mask of the spliced prompt
    prefix_len: int = 0  # prompt length S before splicing


class LaVINModel(MMATunerMixin, BaseTuner):
    """Injects MM-adapters (`MMAdapter`) into a `LlamaForCausalLM`; holds the model-level parts per adapter.

    Model-level containers (keyed by adapter name, saved): `mma_lavin_modality` (2, C) modality embedding E_m,
    N(0, 1); `mma_lavin_visual` the frozen `VisionBackbone` (only its adapters are saved); `mma_lavin_proj_in`,
    `mma_lavin_proj_out` the projector Linear(C_v → 128) → SiLU → Linear(128 → C), xavier weights, zero biases (§4).
    """

    prefix = "mma_lavin_"
    tuner_layer_cls = LaVINLayer
    target_module_mapping = {"llama": ["self_attn"]}
    special_forward_args = SPECIAL_FORWARD_ARGS

    # ---------------------------------------------------------------- injection
    def inject_adapter(
        self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False, state_dict=None
    ) -> None:
        config = self.peft_config[adapter_name]
        check_supported_model(model)
        targets = config.target_modules if isinstance(config.target_modules, list) else []
        unknown = sorted(set(targets) - set(CONSUMERS))
        if unknown or ("mlp" in targets and "self_attn" not in targets):
            raise ValueError(
                f"`target_modules`={config.target_modules!r}: LaVIN adapts `self_attn` (and `mlp` for placement "
                "'block'); leave `target_modules` unset and choose `adapter_placement` instead."
            )
        width, groups = model.config.hidden_size, config.adapter_groups
        if width % groups:
            raise ValueError(
                f"`adapter_groups`={groups} must divide the model width {width}; pick a divisor of {width}."
            )
        visual = self._build_visual(model, config) if config.has_vision else None
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        self._add_model_level(model, adapter_name, config, visual)
        self._link_siblings(model)
        if getattr(self, "_lavin_hook", None) is None:
            self._lavin_hook = model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True)
        active = [a for a in self.active_adapters if a in self.peft_config]
        self.set_adapter(self.active_adapters, inference_mode=any(self.peft_config[a].inference_mode for a in active))

    def _build_visual(self, model: nn.Module, config: LaVINConfig) -> VisionBackbone:
        meta = model.get_input_embeddings().weight.device.type == "meta"
        with torch.device("meta") if meta else nullcontext():
            visual = VisionBackbone(config.vision_model, config.vision_pretrained, config.vision_model_kwargs)
        every = config.vision_feature_every
        if visual.depth % every:
            raise ValueError(
                f"`vision_feature_every`={every} must divide the depth {visual.depth} of `vision_model`="
                f"{config.vision_model!r} (ViT-L/14: 24 blocks, every 4 → 6 visual tokens)."
            )
        return visual

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, LaVINLayer):
            target.update_layer(adapter_name, peft_config)
            return
        names = CONSUMERS.get(target_name, ())
        if not names or not all(isinstance(getattr(target, n, None), nn.Linear) for n in names):
            raise TypeError(
                f"LaVIN adapts a LLaMA `self_attn` (q/k/v_proj) or `mlp` (gate/up_proj); `{current_key}` is a "
                f"{type(target).__name__}."
            )
        width = getattr(target, names[0]).in_features
        new = MMAdapter(target, adapter_name, peft_config, width, routing="sample")
        new.lavin_key = current_key
        new.consumers = [getattr(target, n) for n in names]
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    def _add_model_level(self, model, adapter_name: str, config: LaVINConfig, visual) -> None:
        for role, kind in (
            ("modality", nn.ParameterDict),
            ("visual", nn.ModuleDict),
            ("proj_in", nn.ModuleDict),
            ("proj_out", nn.ModuleDict),
        ):
            if not hasattr(self, self.prefix + role):
                setattr(self, self.prefix + role, kind())
        embed = model.get_input_embeddings().weight
        width = embed.shape[1]
        kw = dict(device=embed.device, dtype=torch.float32)
        self.mma_lavin_modality[adapter_name] = nn.Parameter(torch.randn(2, width, **kw))  # E_m ~ N(0, 1)
        if visual is None:
            return
        if embed.is_floating_point() and embed.device.type != "meta":
            visual.to(dtype=embed.dtype)  # the frozen encoder in the base's precision; its adapters stay fp32
        if config.vision_adapters:
            for block in visual.blocks:
                attn_name = "attn" if hasattr(block, "attn") else "self_attn"
                attn = getattr(block, attn_name)
                setattr(block, attn_name, MMAdapter(attn, adapter_name, config, visual.width, routing="token"))
        if embed.device.type != "meta":
            visual.to(embed.device)
        self.mma_lavin_visual[adapter_name] = visual
        self.mma_lavin_proj_in[adapter_name] = nn.Linear(visual.width, config.projector_hidden, **kw)
        self.mma_lavin_proj_out[adapter_name] = nn.Linear(config.projector_hidden, width, **kw)
        if embed.device.type != "meta":
            for linear in (self.mma_lavin_proj_in[adapter_name], self.mma_lavin_proj_out[adapter_name]):
                nn.init.xavier_uniform_(linear.weight), nn.init.zeros_(linear.bias)

    def _link_siblings(self, model: nn.Module) -> None:
        """Each decoder layer's `self_attn` adapter hands the per-call routing to the adapters of its layer."""
        for layer in model.model.layers:
            adapters = [m for m in layer.children() if isinstance(m, MMAdapter)]
            for adapter in adapters:
                adapter.siblings = adapters if isinstance(adapter, MMAdapter) and adapter is layer.self_attn else []

    def _llm_adapters(self) -> list[MMAdapter]:
        return [m for m in self.model.modules() if isinstance(m, MMAdapter) and m.routing == "sample"]

    # ---------------------------------------------------------------- adapters: set / delete / enable
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        active = set(self.active_adapters)
        for role in ("modality", "visual", "proj_in", "proj_out"):
            container = getattr(self, self.prefix + role, None) or {}
            for name, part in container.items():
                trainable = name in active and not inference_mode
                params = (
                    [part]
                    if isinstance(part, nn.Parameter)
                    else [p for n, p in part.named_parameters() if role != "visual" or self.prefix in n]
                )
                for p in params:
                    p.requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._delete_model_level_adapter(adapter_name)

    def enable_adapter_layers(self) -> None:
        super().enable_adapter_layers()
        self._lavin_disabled = False

    def disable_adapter_layers(self) -> None:
        super().disable_adapter_layers()
        self._lavin_disabled = True

    # ---------------------------------------------------------------- per call
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Entered once per `PeftModel.forward` and once per `generate`: checks and stores `pixel_values` and
        `image_mask` for the pre-hook; everything computed from them is cached for the whole call."""
        call = self._new_call(kwargs.get("pixel_values"), kwargs.get("image_mask"), _batch_of(args, kwargs))
        previous, self._lavin_call = getattr(self, "_lavin_call", None), call
        try:
            yield
        finally:
            self._lavin_call = previous

    def _active_name(self) -> str | None:
        active = [a for a in self.active_adapters if a in getattr(self, "mma_lavin_modality", {})]
        if len(active) > 1:
            raise ValueError(f"LaVIN routes with one active adapter at a time; got active adapters {active}.")
        return active[0] if active else None

    def _new_call(self, pixel_values, image_mask, batch: int | None) -> _Call:
        name = self._active_name()
        if name is None:
            return _Call()
        config = self.peft_config[name]
        if image_mask is not None:
            if not isinstance(image_mask, torch.Tensor) or image_mask.ndim != 1 or image_mask.dtype != torch.bool:
                raise ValueError(f"`image_mask` must be a 1-D bool tensor (one flag per sample); got {image_mask!r}.")
            if batch is not None and len(image_mask) != batch:
                raise ValueError(f"`image_mask` has {len(image_mask)} flags for a batch of {batch} sequences.")
            if bool(image_mask.any()) and pixel_values is None:
                raise ValueError("`image_mask` marks samples with images but no `pixel_values` were passed.")
        if pixel_values is None:
            return _Call(has_image=image_mask)
        if not config.has_vision:
            raise ValueError(
                f"`pixel_values` were passed but adapter {name!r} has no vision model (`vision_model`=None); build "
                "the config with `vision_model=...` (e.g. LaVINConfig.from_preset('lavin-7b')) to use images."
            )
        self.mma_lavin_visual[name].check_pixel_values(pixel_values, batch)
        if image_mask is not None and len(image_mask) != len(pixel_values):
            raise ValueError(f"`image_mask` has {len(image_mask)} flags for {len(pixel_values)} images.")
        has_image = image_mask if image_mask is not None else torch.ones(len(pixel_values), dtype=torch.bool)
        return _Call(pixel_values=pixel_values, has_image=has_image.to(pixel_values.device))

    def encode_images(self, pixel_values: torch.Tensor, adapter_name: str | None = None) -> torch.Tensor:
        """(B, 3, H, W) → visual tokens (B, n, C): P(CLS after every k-th adapted encoder block), §4."""
        name = adapter_name or self._active_name()
        config, visual = self.peft_config[name], self.mma_lavin_visual[name]
        features = visual.prefix_intermediates(pixel_values, config.vision_feature_every)  # (B, n, C_v)
        proj_in, proj_out = self.mma_lavin_proj_in[name], self.mma_lavin_proj_out[name]
        return proj_out(nn.functional.silu(proj_in(features.to(proj_in.weight.dtype))))  # (B, n, C)

    def _model_pre_hook(self, module, args, kwargs):
        if "lavin_routing" in kwargs or getattr(self, "_lavin_disabled", False):
            return None
        name = self._active_name()
        if name is None:
            return None
        if args:  # LlamaForCausalLM(input_ids, attention_mask, ...) called positionally
            kwargs = {**dict(zip(("input_ids", "attention_mask"), args)), **kwargs}
        call = getattr(self, "_lavin_call", None) or _Call()
        if call.pixel_values is not None:
            kwargs = self._splice(name, call, kwargs)
        batch = _batch_of((), kwargs)
        has_image = call.has_image if call.has_image is not None else torch.zeros(batch, dtype=torch.bool)
        kwargs["lavin_routing"] = self._routing(name, call, has_image, batch)
        return (), kwargs

    def _routing(self, name: str, call: _Call, has_image: torch.Tensor, batch: int) -> dict:
        """{lavin_key: {name: (B, 2)}}: the side-pass weights of each sample's modality (cached per call)."""
        table = call.routing
        if table is None or torch.is_grad_enabled():
            # a merged layer needs no weights: the side pass runs only up to the last unmerged one, if any
            adapters = [a for a in self._llm_adapters() if not a.merged]
            records = modality_side_pass(self.model, self.mma_lavin_modality[name], adapters) if adapters else {}
            # (2 modalities, 2) per adapter layer
            table = {a.lavin_key: records[a][name] for a in adapters if name in records[a]}
            if not torch.is_grad_enabled():
                call.routing = table
        elif call.per_sample is not None and call.per_sample[0] == batch:
            return call.per_sample[1]  # every decoding step of a `generate` call routes alike
        modality = has_image.long()
        if batch != len(modality):  # generate expands each sample (beams, num_return_sequences)
            modality = modality.repeat_interleave(batch // len(modality))
        routing = {key: {name: weights[modality.to(weights.device)]} for key, weights in table.items()}
        if not torch.is_grad_enabled():
            call.per_sample = (batch, routing)
        return routing

    def _splice(self, name: str, call: _Call, kwargs: dict) -> dict:
        """Prefill: insert the visual tokens (`lavin.sequence`). Decoding: extend the mask and positions to match."""
        past = kwargs.get("past_key_values")
        past_len = past.get_seq_length() if past is not None else 0
        mask = kwargs.get("attention_mask")
        if past_len > 0:
            if call.prefix_mask is None:
                raise ValueError("`pixel_values` cannot be combined with a pre-filled `past_key_values`.")
            step = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
            batch, prefix = step.shape[0], call.prefix_mask
            if batch != prefix.shape[0]:  # generate expands each sample (beams, num_return_sequences)
                prefix = prefix.repeat_interleave(batch // prefix.shape[0], dim=0)
            if mask is None:
                new = prefix.new_ones(batch, past_len - prefix.shape[1] + step.shape[1])
            else:
                new = mask[:, call.prefix_len :].to(prefix.dtype)
            full = torch.cat([prefix, new], dim=1)
            return {**kwargs, "attention_mask": full, "position_ids": positions(full)[:, -step.shape[1] :]}
        config = self.peft_config[name]
        input_ids, embeds = kwargs.pop("input_ids", None), kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = self.model.get_input_embeddings()(input_ids)
        batch, length = embeds.shape[:2]
        images = len(call.has_image)
        if batch % images or (batch != images and past is None):  # only cached `generate` expands the batch
            raise ValueError(f"{images} images (`pixel_values`) for a batch of {batch} sequences.")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        if call.visual is None or torch.is_grad_enabled():
            call.visual = self.encode_images(call.pixel_values, name)
        # generate expands each sample batch // images times (beams, num_return_sequences)
        visual, has_image = (
            call.visual.repeat_interleave(batch // images, 0),
            call.has_image.repeat_interleave(batch // images),
        )
        left = past is not None or bool((mask[:, 0] == 0).any())
        embeds, new_mask, labels, position_ids = insert_visual_tokens(
            embeds,
            mask,
            kwargs.get("labels"),
            input_ids,
            visual,
            has_image,
            position=config.image_token_position,
            bos_id=self.model.config.bos_token_id,
            image_token_id=config.image_token_id,
            left=left,
        )
        limit = self.model.config.max_position_embeddings
        if embeds.shape[1] > limit:
            raise ValueError(
                f"With {call.visual.shape[1]} visual tokens the sequence has {embeds.shape[1]} positions, more than "
                f"`max_position_embeddings`={limit}; shorten the text."
            )
        call.prefix_mask, call.prefix_len = new_mask, length
        kwargs.update(inputs_embeds=embeds, attention_mask=new_mask, position_ids=position_ids)
        if labels is not None:
            kwargs["labels"] = labels
        return kwargs

    # ---------------------------------------------------------------- loading
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check the checkpoint against this base (width, depth), and fill in the frozen vision weights.

        The frozen encoder is rebuilt from the config and never saved; its current tensors are passed back in so
        that PEFT does not report them as missing.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = model.state_dict()
        for key, tensor in remapped.items():
            if cls.prefix not in key:
                continue
            if key not in own:
                raise ValueError(
                    f"The adapter has `{key}`, which this base model lacks: it was trained on a base with another "
                    "depth (number of decoder layers). Load it onto the base model it was trained with."
                )
            if own[key].shape != tensor.shape:
                raise ValueError(
                    f"The adapter's `{key}` has shape {tuple(tensor.shape)} but this base model needs "
                    f"{tuple(own[key].shape)}: it was trained on a base with another width. Load it onto the base "
                    "model it was trained with."
                )
        frozen = f"{cls.prefix}visual.{adapter_name}."
        for key, tensor in own.items():
            if frozen in key and cls.prefix not in key.split(frozen, 1)[1] and key not in remapped:
                remapped[key] = tensor
        return remapped

    # ---------------------------------------------------------------- merge / unload
    def _set_merge_routing(self, adapter_names: list[str] | None, modality: str | None) -> None:
        names = adapter_names or self.active_adapters
        adapters = self._llm_adapters()
        training = self.model.training
        self.model.eval()  # no dropout in the side pass that fixes the weights
        try:
            for name in names:
                chosen = modality or self.peft_config[name].merge_modality
                if chosen not in ("text", "image"):
                    raise ValueError(f"`modality`={chosen!r} must be 'text' or 'image'.")
                previous = self.active_adapter
                self.set_adapter(name)
                with torch.no_grad():
                    records = modality_side_pass(self.model, self.mma_lavin_modality[name], adapters)
                self.set_adapter(previous)
                for adapter in adapters:
                    adapter.merge_routing[name] = records[adapter][name][int(chosen == "image")]
        finally:
            self.model.train(training)

    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False, modality: str | None = None
    ) -> None:
        """Fold the adapter into q/k/v (and gate/up) for `modality` ('text' or 'image'; the config's
        `merge_modality` by default). See `MMAdapter.merge` for the algebra."""
        self._set_merge_routing(adapter_names, modality)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        modality: str | None = None,
    ) -> nn.Module:
        """A plain `LlamaForCausalLM` whose q/k/v (and gate/up) carry the adapter routed for `modality`.

        The vision bridge is dropped. Merging creates q/k/v biases, so `config.attention_bias` (and `mlp_bias` for
        placement 'block') is set and the other projections get zero biases, so that transformers reloads it.
        """
        self._set_merge_routing(adapter_names, modality)
        placements = {adapter.lavin_key.rsplit(".", 1)[-1] for adapter in self._llm_adapters()}
        model = super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        _add_zero_biases(model, attention="self_attn" in placements, mlp="mlp" in placements)
        return model

    def _unload_and_optionally_merge(self, *args, **kwargs):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        if getattr(self, "_lavin_hook", None) is not None:
            self._lavin_hook.remove()
            self._lavin_hook = None
        return model


def _add_zero_biases(model: nn.Module, attention: bool, mlp: bool) -> None:
    groups = [("attention_bias", "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"))] if attention else []
    groups += [("mlp_bias", "mlp", ("gate_proj", "up_proj", "down_proj"))] if mlp else []
    for flag, module_name, names in groups:
        setattr(model.config, flag, True)
        for layer in model.model.layers:
            for linear in (getattr(getattr(layer, module_name), n) for n in names):
                if linear.bias is None:
                    weight = linear.weight
                    linear.bias = nn.Parameter(weight.new_zeros(weight.shape[0]), requires_grad=False)


def _batch_of(args, kwargs) -> int | None:
    for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return None


def _special_forward_args(self) -> set[str]:
    """`PeftModel.special_peft_forward_args`, plus the kwargs its tuner consumes in `_enable_peft_forward_hooks`."""
    extra = getattr(type(self.__dict__.get("_modules", {}).get("base_model")), "special_forward_args", ())
    return self.__dict__.get("_special_peft_forward_args", set()) | set(extra)


def _set_special_forward_args(self, value: set[str]) -> None:
    self.__dict__["_special_peft_forward_args"] = set(value)


if not isinstance(PeftModel.__dict__.get("special_peft_forward_args"), property):
    # PEFT strips only these kwargs before the base model's forward/generate; `generate` rejects unknown kwargs.
    PeftModel.special_peft_forward_args = property(_special_forward_args, _set_special_forward_args)

register(MMA_LAVIN, LaVINConfig, LaVINModel)
