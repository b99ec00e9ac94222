"""LaVIN's Mixture-of-Modality Adaptation as a PEFT tuner (DESIGN.md decisions 3, 4; `lavin_mma.md`).

Paper: "Cheap and Quick: Efficient Vision-Language Instruction Tuning for Large Language Models",
https://arxiv.org/abs/2305.15023.

The tuner puts an `MMAdapter` on the normalised input of every decoder layer's `self_attn` (and `mlp` for placement
"block") and keeps the model-level parts of each adapter: the modality embedding E_m, and the visual path
(`lavin.visual`). `get_peft_model` returns a `PeftModelForCausalLM` (the config's `task_type` is always
"CAUSAL_LM"), whose `forward` and `generate` call this tuner's with every keyword. These take `pixel_values` and
`has_image` out (`lavin.call`) and call the LLaMA model, whose forward pre-hook, for every forward of the call,
  1. encodes the images once and splices the visual tokens into the input (`lavin.call`, `lavin.sequence`);
  2. computes the router weights per sample from its modality (0 text, 1 image) with the side pass of
     `peft_mma.router`, once per call when gradients are off, on every forward when they are on;
  3. passes them down as the `lavin_routing` kwarg, which reaches every `self_attn` (and is replayed by gradient
     checkpointing when it recomputes a layer).

Usage::

    model = get_peft_model(llama, LaVINConfig.from_preset("lavin-7b"))
    out = model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=images, has_image=has_image)
    model.generate(input_ids=ids, attention_mask=mask, pixel_values=images, has_image=has_image, max_new_tokens=64)
    llama_merged = model.merge_and_unload(modality="text")   # or "image"; default: `config.merge_modality`

The inputs (`pixel_values`, `has_image`, mixed batches, padding) are described in `lavin.call`. One LaVIN adapter
may be active at a time (the side pass routes with one modality embedding); `set_adapter` refuses several.

Known deviations from the official code: images do not couple across the batch (§4 layout bug not reproduced);
the routing weights are not rounded to fp16 (§9).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..router import modality_side_pass
from ..tuner_utils import MMATunerMixin
from ..utils import check_supported_model, declare_merged_biases
from ..vision.backbone import VisionBackbone
from .call import Call, batch_of, expand, new_call, splice
from .config import LaVINConfig
from .layer import LaVINLayer, MMAdapter
from .visual import add_encoder_adapters, build_encoder, build_projector, visual_tokens

CONSUMERS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


class LaVINModel(MMATunerMixin, BaseTuner):
    """Injects MM-adapters (`MMAdapter`) into a `LlamaForCausalLM`; holds the model-level parts per adapter.

    Model-level containers (keyed by adapter name, saved): `mma_lavin_modality` (2, C) modality embedding E_m,
    N(0, 1); `mma_lavin_visual` the frozen `VisionBackbone` (only its adapters are saved); `mma_lavin_proj_in`,
    `mma_lavin_proj_out` the projector W₁, W₂ of `lavin.visual` (§4).
    """

    prefix = "mma_lavin_"
    tuner_layer_cls = LaVINLayer
    target_module_mapping = {"llama": ["self_attn"]}
    _lavin_call: Call | None = None  # the call in progress (`forward` / `generate`)
    _lavin_disabled = False  # `disable_adapter_layers()`: images are ignored, the base model runs unchanged
    _lavin_hook = None  # the forward pre-hook on the LLaMA model

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
        on_meta = model.get_input_embeddings().weight.device.type == "meta"
        visual = build_encoder(config, on_meta) if config.has_vision else None
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        self._add_model_level(model, adapter_name, config, visual)
        self._link_siblings(model)
        if self._lavin_hook is None:
            self._lavin_hook = model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True)
        active = [a for a in self.active_adapters if a in self.peft_config]
        self.set_adapter(self.active_adapters, inference_mode=any(self.peft_config[a].inference_mode for a in active))

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

    def _add_model_level(
        self, model: nn.Module, adapter_name: str, config: LaVINConfig, visual: VisionBackbone | None
    ) -> None:
        """E_m ~ N(0, 1) (2, C); with a vision model, the encoder's adapters and the projector (`lavin.visual`)."""
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
        self.mma_lavin_modality[adapter_name] = nn.Parameter(
            torch.randn(2, width, device=embed.device, dtype=torch.float32)
        )
        if visual is None:
            return
        if embed.is_floating_point() and embed.device.type != "meta":
            visual.to(dtype=embed.dtype)  # the frozen encoder in the base's precision; its adapters stay fp32
        if config.vision_adapters:
            add_encoder_adapters(visual, adapter_name, config, training=self.training)
        if embed.device.type != "meta":
            visual.to(embed.device)
        self.mma_lavin_visual[adapter_name] = visual
        proj_in, proj_out = build_projector(visual.width, config.projector_hidden, width, embed.device)
        self.mma_lavin_proj_in[adapter_name], self.mma_lavin_proj_out[adapter_name] = proj_in, proj_out

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
        """Activate one adapter (`name` or `[name]`); its parts, and only its parts, become trainable.

        LaVIN runs one adapter at a time: the side pass routes every layer from one modality embedding, and the
        visual tokens come from one encoder. Several names raise a `ValueError` and change nothing.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(
                f"LaVIN runs one adapter at a time (one modality embedding routes every layer); got active adapters "
                f"{names}. Activate one with `set_adapter(name)`."
            )
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter {unknown[0]!r} does not exist; the adapters are {sorted(self.peft_config)}.")
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
    def forward(
        self, *args, pixel_values: torch.Tensor | None = None, has_image: torch.Tensor | None = None, **kwargs
    ):
        """The LLaMA model's forward, with `pixel_values` (B, 3, H, W) and `has_image` (B,) bool taken out here."""
        with self._call(args, kwargs, pixel_values, has_image):
            return self.model(*args, **kwargs)

    def generate(
        self, *args, pixel_values: torch.Tensor | None = None, has_image: torch.Tensor | None = None, **kwargs
    ):
        """The LLaMA model's `generate`; the visual tokens and router weights are computed once for all its steps."""
        with self._call(args, kwargs, pixel_values, has_image):
            return self.model.generate(*args, **kwargs)

    @contextmanager
    def _call(self, args: tuple, kwargs: dict, pixel_values, has_image):
        """Check and keep the call's images for the pre-hook; everything computed from them is cached per call."""
        name = None if self._lavin_disabled else self._active_name()
        call = Call()
        if name is not None:
            visual = self.mma_lavin_visual[name] if name in self.mma_lavin_visual else None
            call = new_call(name, self.peft_config[name], visual, pixel_values, has_image, batch_of(args, kwargs))
        previous, self._lavin_call = self._lavin_call, call
        try:
            yield
        finally:
            self._lavin_call = previous

    def _active_name(self) -> str | None:
        active = [a for a in self.active_adapters if a in getattr(self, "mma_lavin_modality", {})]
        if len(active) > 1:
            raise ValueError(f"LaVIN routes with one active adapter at a time; got active adapters {active}.")
        return active[0] if active else None

    def encode_images(self, pixel_values: torch.Tensor, adapter_name: str | None = None) -> torch.Tensor:
        """(B, 3, H, W) → visual tokens (B, n, C) of the active adapter (or `adapter_name`), `lavin.visual`."""
        name = adapter_name or self._active_name()
        visual, every = self.mma_lavin_visual[name], self.peft_config[name].vision_feature_every
        return visual_tokens(visual, self.mma_lavin_proj_in[name], self.mma_lavin_proj_out[name], pixel_values, every)

    def _model_pre_hook(self, module, args, kwargs):
        if "lavin_routing" in kwargs or self._lavin_disabled:
            return None
        name = self._active_name()
        if name is None:
            return None
        if args:  # LlamaForCausalLM(input_ids, attention_mask, ...) called positionally
            kwargs = {**dict(zip(("input_ids", "attention_mask"), args)), **kwargs}
        call = self._lavin_call or Call()
        if call.pixel_values is not None:
            embed, config = self.model.get_input_embeddings(), self.peft_config[name]
            kwargs = splice(call, kwargs, config, self.model.config, embed, lambda x: self.encode_images(x, name))
        batch = batch_of((), kwargs)
        has_image = call.has_image if call.has_image is not None else torch.zeros(batch, dtype=torch.bool)
        kwargs["lavin_routing"] = self._routing(name, call, has_image, batch)
        return (), kwargs

    def _routing(self, name: str, call: Call, has_image: torch.Tensor, batch: int) -> dict:
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
        modality = expand(has_image.long(), batch)  # generate expands each sample (beams, num_return_sequences)
        on_device: dict[torch.device, torch.Tensor] = {}  # one host-to-device copy per device, not one per layer
        routing = {}
        for key, weights in table.items():
            if weights.device not in on_device:
                on_device[weights.device] = modality.to(weights.device)
            routing[key] = {name: weights[on_device[weights.device]]}
        if not torch.is_grad_enabled():
            call.per_sample = (batch, routing)
        return routing

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
        model = super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        declare_merged_biases(model)
        return model

    def _unload_and_optionally_merge(self, *args, **kwargs):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        if self._lavin_hook is not None:
            self._lavin_hook.remove()
            self._lavin_hook = None
        return model
