"""LaVIN's Mixture-of-Modality Adaptation as a PEFT tuner (DESIGN.md decisions 3, 4, 8; `lavin_mma.md`).

Paper: "Cheap and Quick: Efficient Vision-Language Instruction Tuning for Large Language Models",
https://arxiv.org/abs/2305.15023.

The tuner puts an `MMAdapter` on the normalised input of every decoder layer's `self_attn` (and `mlp` for placement
"block") and keeps the model-level parts of each adapter: the modality embedding E_m, and the visual path
(`lavin.visual`). `get_peft_model` returns a `PeftModelForCausalLM` (the config's `task_type` is always
"CAUSAL_LM"), whose `forward` and `generate` call this tuner's with every keyword. Each call (`lavin.inputs`):

  1. checks its inputs, embeds the text and writes the visual tokens of `pixel_values` at the image placeholders of
     `input_ids` (n per image; `peft_mma.data.ImageTokens` puts them there);
  2. puts the modality token E_m[m] in front of every sequence (m = 1 with an image), which each adapter routes
     from, inside the same model call (with `router="modality"` no token: each adapter takes its weights from the
     modality flag, `LaVINCall.fixed`);
  3. hands one `LaVINCall` down as the keyword `attention.STATE_KWARG`, and returns logits that line up with
     `input_ids` (`generate`: the prompt ids followed by the new tokens).

Usage::

    model = get_peft_model(llama, LaVINConfig.from_preset("lavin-7b"))
    batch = CausalLMCollator(tokenizer, image_tokens=ImageTokens.from_config(model.peft_config["default"]))(samples)
    out = model(**batch)                        # input_ids with placeholders, pixel_values, has_image, labels
    model.generate(input_ids=ids, attention_mask=mask, pixel_values=images, max_new_tokens=64)
    llama_merged = model.merge_and_unload(modality="text")   # or "image"; default: `config.merge_modality`

One LaVIN adapter may be active at a time (the modality token comes from one embedding, the visual tokens from one
encoder); `set_adapter` refuses several. Known deviations from the official code: images do not couple across the
batch (§4 layout bug not reproduced); the routing weights, the modality embedding E_m and the projector's input are
not rounded to fp16 (the official `.half()` casts, §9: about 1e-4 in the logits of an fp32 run). Options the
official code does not have: `adapter_bias=False` and `router="modality"` (`LaVINConfig`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from peft.utils.integrations import skip_init_on_device
from torch import nn
from transformers import LogitsProcessorList

from ..attention import STATE_KWARG, install_mma_attention, state_handed_to, uninstall_mma_attention
from ..tuner_utils import (
    MMATunerMixin,
    check_base_size,
    fill_for_base,
    reused_config_message,
    unused_image_side_zero,
)
from ..utils import check_supported_model, declare_merged_biases
from ..vision.backbone import VisionBackbone
from .config import LaVINConfig
from .inputs import (
    WITH_VISION,
    LaVINCall,
    ModalityTokenConsumed,
    assemble,
    check_aligned,
    check_call,
    ids_for_processors,
    restore_prompt,
    strip_modality_token,
)
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
    # every call goes through this tuner (the modality token, the image tokens), so PEFT's `inject_adapter_in_model`,
    # which keeps only the injected LLaMA (transformers' `load_adapter`), refuses LaVIN with a message
    uses_shared_state = True
    target_module_mapping = {"llama": ["self_attn"]}
    _lavin_disabled = False  # `disable_adapter_layers()`: the base model runs unchanged

    # ---------------------------------------------------------------- injection
    def inject_adapter(
        self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False, state_dict=None
    ) -> None:
        config = self.peft_config[adapter_name]
        check_supported_model(model)
        check_base_size(config, model)
        targets = config.target_modules if isinstance(config.target_modules, list) else []
        unknown = sorted(set(targets) - set(CONSUMERS))
        if unknown or ("mlp" in targets and "self_attn" not in targets):
            raise ValueError(
                f"`target_modules`={config.target_modules!r}: LaVIN adapts `self_attn` (and `mlp` for placement "
                "'block'); leave `target_modules` unset and choose `adapter_placement` instead."
            )
        self._check_targets(config, model)
        width, groups = model.config.hidden_size, config.adapter_groups
        if width % groups:
            raise ValueError(
                f"`adapter_groups`={groups} must divide the model width {width}; pick a divisor of {width}."
            )
        on_meta = model.get_input_embeddings().weight.device.type == "meta"
        visual = skip_init_on_device(build_encoder)(config, on_meta) if config.has_vision else None
        if visual is not None and config.vision_adapters and visual.width % groups:
            raise ValueError(
                f"`adapter_groups`={groups} must divide the vision encoder's width {visual.width} too (its blocks "
                f"carry MM-adapters); pick a common divisor of {width} and {visual.width}, or vision_adapters=False."
            )
        image_tokens = self._image_tokens(config, model, visual)
        with self.others_trainability_kept():  # the `set_adapter` below would set them by activity
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
            self._add_model_level(model, adapter_name, config, visual)
            fill_for_base(
                config,
                image_token_id=image_tokens[0],
                num_image_tokens=image_tokens[1],
                base_num_layers=model.config.num_hidden_layers,
                base_hidden_size=width,
            )
            install_mma_attention(model)
            model.add_model_tags(["peft_mma", "lavin"])  # PEFT's model card names the plugin and the method
            active = [a for a in self.active_adapters if a in self.peft_config]
            inference_mode = any(self.peft_config[a].inference_mode for a in active)
            self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _check_targets(self, config: LaVINConfig, model: nn.Module) -> None:
        """Before anything is injected: every module the config targets is a LLaMA `self_attn` or `mlp` (a regex
        `target_modules` may match others), `layers_to_transform` lies within the depth, and the learnt router's
        attention is no flex attention, whose block masks its modality token cannot be sliced from."""
        depth = model.config.num_hidden_layers
        layers = config.layers_to_transform
        layers = [layers] if isinstance(layers, int) else list(layers or [])
        outside = [i for i in layers if not 0 <= i < depth]
        if outside:
            raise ValueError(
                f"`layers_to_transform`={config.layers_to_transform!r}: the base has layers 0–{depth - 1}."
            )
        implementation = model.config._attn_implementation or "eager"
        if config.router == "learnt" and implementation.startswith("flex"):
            raise ValueError(
                f"LaVIN's learnt router cannot run on attn_implementation={implementation!r} (its block masks cannot "
                "give the modality token's row apart); load the base with attn_implementation='sdpa' or 'eager', or "
                "use router='modality'."
            )
        for key, module in model.named_modules():
            parts = key.split(".")
            if "base_layer" in parts or any(part.startswith(self.prefix) for part in parts):
                continue
            if not check_target_module_exists(config, key):
                continue
            names = CONSUMERS.get(parts[-1], ())
            if isinstance(module, LaVINLayer) or (
                names and all(isinstance(getattr(module, n, None), nn.Linear) for n in names)
            ):
                continue
            raise ValueError(
                f"`target_modules`={config.target_modules!r} matches `{key}`, a {type(module).__name__}: LaVIN adapts "
                "a LLaMA `self_attn` (q/k/v_proj) or `mlp` (gate/up_proj)."
            )

    @staticmethod
    def _image_tokens(config: LaVINConfig, model: nn.Module, visual: VisionBackbone | None) -> tuple[int, int | None]:
        """(`image_token_id`, `num_image_tokens`) for this base and encoder; the id defaults to the base's vocabulary
        size, which no text token can have. Raises if a saved count disagrees with the encoder."""
        token_id = model.config.vocab_size if config.image_token_id is None else config.image_token_id
        vocabulary = model.config.vocab_size
        if token_id != vocabulary:  # a text token of this base, where a `get_peft_model` filled it in for another
            message = reused_config_message(
                config, ["image_token_id"], f"the image token id {token_id}", f"a vocabulary of {vocabulary}"
            )
            if message:
                raise ValueError(message)
        count = visual.depth // config.vision_feature_every if visual is not None else None
        if config.num_image_tokens not in (None, count):
            raise ValueError(
                f"`num_image_tokens`={config.num_image_tokens}, but `vision_model`={config.vision_model!r} gives "
                f"{count} visual tokens per image (its depth {visual.depth if visual else 0} / `vision_feature_every`"
                f"={config.vision_feature_every}); leave `num_image_tokens` unset."
            )
        return token_id, count

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, LaVINLayer):
            target.update_layer(adapter_name, peft_config)
            return
        names = CONSUMERS[target_name]  # `_check_targets` refused every other target before injection
        width = getattr(target, names[0]).in_features
        new = MMAdapter(target, adapter_name, peft_config, width, routing="sample")
        new.lavin_key = current_key
        new.consumers = [getattr(target, n) for n in names]
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    @skip_init_on_device  # under `low_cpu_mem_usage` too: the frozen encoder is not in the adapter file
    def _add_model_level(
        self, model: nn.Module, adapter_name: str, config: LaVINConfig, visual: VisionBackbone | None
    ) -> None:
        """E_m ~ N(0, 1) (2, C) for the learnt router; with a vision model, the encoder's adapters and the projector
        (`lavin.visual`)."""
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
        if config.router == "learnt":  # `router="modality"` routes by the modality flag: no token, no E_m
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
        proj_in, proj_out = build_projector(
            visual.width, config.projector_hidden, width, embed.device, config.projector_init_scale
        )
        self.mma_lavin_proj_in[adapter_name], self.mma_lavin_proj_out[adapter_name] = proj_in, proj_out

    def _llm_adapters(self) -> list[MMAdapter]:
        return [m for m in self.model.modules() if isinstance(m, MMAdapter) and m.routing == "sample"]

    def _keywordless_adapters(self) -> list[MMAdapter]:
        """The decoder adapters that transformers calls without keywords (`mlp`, placement 'block')."""
        return [m for m in self._llm_adapters() if not m.keyword_call]

    # ---------------------------------------------------------------- adapters: set / delete / enable
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter (`name` or `[name]`); its parts, and only its parts, become trainable.

        LaVIN runs one adapter at a time: the modality token comes from one embedding, and the visual tokens from
        one encoder. Several names raise a `ValueError` and change nothing.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(
                f"LaVIN runs one adapter at a time (one modality embedding routes every layer); got active adapters "
                f"{names}. Activate one with `set_adapter(name)`."
            )
        self._check_adapter_names(names)
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

    def enable_adapter_layers(self) -> None:
        super().enable_adapter_layers()
        self._lavin_disabled = False

    def disable_adapter_layers(self) -> None:
        super().disable_adapter_layers()
        self._lavin_disabled = True

    def _active_name(self) -> str | None:
        """The active LaVIN adapter, or None when adapters are disabled."""
        if self._lavin_disabled:
            return None
        active = [a for a in self.active_adapters if a in self.peft_config]
        return active[0] if active else None

    # ---------------------------------------------------------------- per call
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        """The LLaMA model's forward on `lavin.inputs`' assembled inputs; logits line up with `input_ids`.

        `pixel_values` (B, 3, H, W): one image per sequence (any image for a text-only one); `has_image` (B,) bool,
        by default the samples whose `input_ids` hold image placeholders.
        """
        name = self._active_name()
        install_mma_attention(self.model)  # again, where the user switched the implementation after attaching LaVIN
        plain = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels)
        if name is None:
            self._check_no_placeholders(input_ids)
            return self.model(**plain, position_ids=position_ids, **kwargs)
        call, batch = self._prepare(name, plain, position_ids, pixel_values, has_image, kwargs)
        keep, labels = kwargs.get("logits_to_keep"), batch.labels
        if batch.front:
            if isinstance(keep, torch.Tensor):  # positions of `input_ids`; those from the end stay
                kwargs = {**kwargs, "logits_to_keep": torch.where(keep >= 0, keep + batch.front, keep)}
            elif not keep:  # all: the caller's S rows alone, so the LM head's output is the logits, contiguous
                kwargs = {**kwargs, "logits_to_keep": batch.inputs_embeds.shape[1] - batch.front}
            if labels is not None:  # the token in front predicts nothing: the loss pairs the caller's positions
                labels = labels[:, batch.front :]
        as_tuple = kwargs.pop("return_dict", None) is False
        output = self.model(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            labels=labels,
            return_dict=True,
            **kwargs,
            **{STATE_KWARG: call},
        )
        output = strip_modality_token(output, batch.inputs_embeds.shape[1] - batch.front)
        return output.to_tuple() if as_tuple else output

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        **kwargs,
    ):
        """The LLaMA model's `generate`, prefilled with the assembled inputs; returns the prompt ids and the new
        tokens. The images are encoded once, and the decoding steps reuse the prefill's routing weights.

        transformers decodes a prompt given as embeddings with its KV cache, so `use_cache=False` has no effect.
        """
        name = self._active_name()
        install_mma_attention(self.model)  # again, where the user switched the implementation after attaching LaVIN
        if name is None:
            self._check_no_placeholders(input_ids)
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        embeds = kwargs.pop("inputs_embeds", None)
        if attention_mask is None and input_ids is not None:
            attention_mask = self._inferred_attention_mask(input_ids, kwargs)
        plain = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=embeds)
        call, batch = self._prepare(name, plain, None, pixel_values, has_image, kwargs)
        prompt = input_ids if input_ids is not None else batch.inputs_embeds.new_zeros(len(batch.has_image), 0).long()
        shown = ids_for_processors(prompt, self.peft_config[name].image_token_id, batch.front)
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        if batch.front:
            processors.append(ModalityTokenConsumed(call))
            kwargs |= self._lengths_past_front(kwargs, batch.front)
        # an explicit mask always: transformers would otherwise build one from `shown != pad_token_id`, and a
        # stand-in id may be the pad id
        mask = batch.attention_mask
        if mask is None:  # embeddings without a mask: every position counts
            mask = torch.ones(batch.inputs_embeds.shape[:2], dtype=torch.long, device=batch.inputs_embeds.device)
        with state_handed_to([self.model, *self._keywordless_adapters()], call):
            output = self.model.generate(
                input_ids=shown,
                inputs_embeds=batch.inputs_embeds,
                attention_mask=mask,
                logits_processor=processors,
                **kwargs,
            )
        return restore_prompt(output, prompt, prompt.shape[1], batch.front)

    def _inferred_attention_mask(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The mask transformers' `generate` infers where none is given, from the caller's ids (the image
        placeholders count as tokens): 0 at the pad id where one is set, occurs and is no EOS id; else all ones."""
        config = kwargs.get("generation_config") or self.model.generation_config
        pad = kwargs.get("pad_token_id", config.pad_token_id)
        eos = kwargs.get("eos_token_id", config.eos_token_id)
        eos = [] if eos is None else torch.as_tensor(eos).flatten().tolist()
        if pad is not None and pad not in eos and bool((input_ids == pad).any()):
            return (input_ids != pad).long()
        return torch.ones_like(input_ids)

    def _lengths_past_front(self, kwargs: dict, front: int) -> dict:
        """`max_length` / `min_length` for `generate`, from its keywords or else its generation config, moved by the
        `front` positions the prompt gains (they count the prompt); none where `max_new_tokens` /
        `min_new_tokens` decide instead, or where the length is unset or 0."""
        config = kwargs.get("generation_config") or self.model.generation_config
        lengths = {}
        for key, instead in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
            if kwargs.get(instead) is not None or (instead not in kwargs and getattr(config, instead, None)):
                continue
            value = kwargs[key] if key in kwargs else getattr(config, key, None)
            if value:
                lengths[key] = value + front
        return lengths

    def _prepare(self, name: str, plain: dict, position_ids, pixel_values, has_image, kwargs: dict):
        """Check the call's inputs (eagerly; not under `torch.compile`) and assemble them for adapter `name`."""
        config = self.peft_config[name]
        visual = self.mma_lavin_visual[name] if name in getattr(self, "mma_lavin_visual", {}) else None
        if pixel_values is not None and visual is None:
            raise ValueError(
                f"`pixel_values` were passed but adapter {name!r} has no vision model (`vision_model`=None); "
                + WITH_VISION
            )
        input_ids, inputs_embeds = plain["input_ids"], plain["inputs_embeds"]
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        inputs = input_ids if input_ids is not None else inputs_embeds
        check_aligned(inputs, plain["attention_mask"], plain.get("labels"))
        if torch.compiler.is_compiling():  # the checks read tensor values, which would break the graph
            if has_image is None:
                has_image = (
                    (input_ids == config.image_token_id).any(-1)
                    if input_ids is not None
                    else torch.zeros(len(inputs_embeds), dtype=torch.bool, device=inputs_embeds.device)
                )
        else:
            if pixel_values is not None:
                visual.check_pixel_values(pixel_values)
            has_image = check_call(config, input_ids, inputs_embeds, pixel_values, has_image, kwargs)
        learnt, routes = config.router == "learnt", self._routes(name)
        modality = self.mma_lavin_modality[name] if learnt and routes else None  # None: no token in front
        zero = self._image_side_zero(name) if routes and pixel_values is None else None
        if zero is not None and modality is not None:
            modality = modality + zero
        batch = assemble(
            config,
            self.model.get_input_embeddings(),
            modality,
            lambda images: self.encode_images(images, name),
            input_ids,
            inputs_embeds,
            plain["attention_mask"],
            position_ids,
            plain.get("labels"),
            pixel_values,
            has_image,
        )
        if learnt or not routes:  # the learnt router; or merged, the routing in the weights: the call runs as the base
            return LaVINCall(modality_token=bool(batch.front), front=batch.front), batch
        if zero is not None:
            batch.inputs_embeds = batch.inputs_embeds + zero.to(batch.inputs_embeds.dtype)
        return LaVINCall(modality_token=False, fixed=self._fixed_routing(batch.has_image)), batch

    @staticmethod
    def _fixed_routing(has_image: torch.Tensor) -> torch.Tensor:
        """The weights of `router="modality"`: (1, 0) for a text-only sample, (0, 1) for one with an image, (B, 2)."""
        return F.one_hot(has_image.long(), 2).float()

    def _routes(self, name: str) -> bool:
        """Whether adapter `name`'s decoder adapters still route (from the modality token, or by the modality flag):
        False once every one is merged (their routing weights are then folded into the base's Linears,
        `MMAdapter.merge`)."""
        return not all(name in m.merged_adapters for m in self._llm_adapters() if name in m.mma_lavin_down)

    def _check_no_placeholders(self, input_ids: torch.Tensor | None) -> None:
        ids = {c.image_token_id for c in self.peft_config.values() if c.image_token_id is not None}
        if input_ids is not None and any(bool((input_ids == i).any()) for i in ids):
            raise ValueError(
                "The input holds image placeholders, but the LaVIN adapters are disabled: the base model cannot read "
                "images. Pass `input_ids` without the placeholders."
            )

    def _image_side_zero(self, name: str) -> torch.Tensor | None:
        """`tuner_utils.unused_image_side_zero` of adapter `name`'s projector and encoder adapters."""
        if name not in getattr(self, "mma_lavin_visual", {}):
            return None
        parts = (self.mma_lavin_proj_in[name], self.mma_lavin_proj_out[name], self.mma_lavin_visual[name])
        return unused_image_side_zero(parts)

    def encode_images(self, pixel_values: torch.Tensor, adapter_name: str | None = None) -> torch.Tensor:
        """(B, 3, H, W) → visual tokens (B, n, C) of the active adapter (or `adapter_name`), `lavin.visual`."""
        name = adapter_name or self._active_name()
        visual, every = self.mma_lavin_visual[name], self.peft_config[name].vision_feature_every
        return visual_tokens(visual, self.mma_lavin_proj_in[name], self.mma_lavin_proj_out[name], pixel_values, every)

    def modality_routing(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """{adapter key: (2, 2)}: each decoder adapter's routing weights for the text (row 0) and image (row 1)
        modality token, from one call on the two tokens, each followed by one zero embedding that it never attends
        to (the attention kernel needs a position besides the token), without dropout or gradients; the identity for
        `router="modality"`."""
        name = adapter_name or self._active_name()
        if self.peft_config[name].router == "modality":
            fixed = self._fixed_routing(torch.tensor([False, True]))  # identity: text → B, image → D
            return {m.lavin_key: fixed.clone() for m in self._llm_adapters() if name in m.mma_lavin_down}
        modality = self.mma_lavin_modality[name]
        tokens = modality.to(self.model.get_input_embeddings().weight.dtype)[:, None]  # (2, 1, C)
        embeds = torch.cat([tokens, torch.zeros_like(tokens)], dim=1)  # (2, 2, C)
        call, training = LaVINCall(front=1), self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), state_handed_to(self._keywordless_adapters(), call):
                self.model(
                    inputs_embeds=embeds,
                    attention_mask=torch.ones(2, 2, dtype=torch.long, device=embeds.device),
                    position_ids=torch.zeros(1, 2, dtype=torch.long, device=embeds.device),
                    use_cache=False,
                    **{STATE_KWARG: call},
                )
        finally:
            self.model.train(training)
        return {key.removesuffix(f".{name}"): w for key, w in call.routing.items() if key.endswith(f".{name}")}

    # ---------------------------------------------------------------- loading
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Fill in the frozen vision weights: the encoder is rebuilt from the config and never saved; its current
        tensors are passed back in so that PEFT does not report them as missing."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        frozen = f"{cls.prefix}visual.{adapter_name}."
        for key, tensor in model.state_dict().items():
            if frozen in key and cls.prefix not in key.split(frozen, 1)[1] and key not in remapped:
                remapped[key] = tensor
        return remapped

    # ---------------------------------------------------------------- merge / unload
    def _set_merge_routing(self, adapter_names: list[str] | None, modality: str | None) -> None:
        self._check_adapter_names(adapter_names)
        for name in adapter_names or self.active_adapters:
            chosen = modality or self.peft_config[name].merge_modality
            if chosen not in ("text", "image"):
                raise ValueError(f"`modality`={chosen!r} must be 'text' or 'image'.")
            routing = self.modality_routing(name)
            chosen_weights = {
                adapter: routing[adapter.lavin_key][int(chosen == "image")]
                for adapter in self._llm_adapters()
                if adapter.lavin_key in routing
            }
            # a merged layer keeps the weights it was folded with, which `unmerge` folds out again
            if any(
                name in adapter.merged_adapters and not torch.equal(adapter.merge_routing[name], weights)
                for adapter, weights in chosen_weights.items()
            ):
                raise ValueError(
                    f"Adapter {name!r} is merged for another modality than {chosen!r}; call `unmerge_adapter()` first."
                )
            for adapter, weights in chosen_weights.items():
                if name not in adapter.merged_adapters:
                    adapter.merge_routing[name] = weights

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
        uninstall_mma_attention(model)
        return model
