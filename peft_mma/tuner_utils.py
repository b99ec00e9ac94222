"""Tuner machinery shared by both methods, on top of PEFT's `BaseTuner` (spec `peft_plugin_api.md` §2).

* Model-level modules (the visual bridge, the modality embedding) live on the tuner in containers keyed by adapter
  name, as VeRA's shared state does; PEFT saves every tuner attribute but `model`.
* The frozen `VisionBackbone` lives on the tuner too, so that `.to()` and `.half()` move it, but its weights are
  left out of the adapter state dict (only adapter containers of tuner layers inside it are kept).
* Adapter containers may be nested (`<prefix>visual.<adapter>.blocks.0.attn.qkv.weight`), so the adapter name is
  removed right after the container name, wherever it is in the key.
* Every tuner layer starts from `MMATunerLayer`: the instance attributes PEFT expects of a `BaseTunerLayer` (spec
  §2.1), and where new adapter parameters are created and then moved (`adapter_parameter_kwargs`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, set_requires_grad
from peft.utils import resolve_quantization_backend
from torch import nn

from .vision.backbone import VisionBackbone

BACKBONE_ATTR = "mma_vision_backbone"  # tuner attribute holding frozen encoders; outside the method prefixes, so
# PEFT does not report their (deliberately unsaved) weights as missing adapter keys on load


def adapter_parameter_kwargs(base: nn.Module) -> dict[str, Any]:
    """`device`/`dtype` keywords for a new adapter parameter of a layer wrapping `base`.

    Adapter parameters are fp32. They are created on the meta device when the base is there (counting parameters
    without memory), else on the default device, and `MMATunerLayer._finish_update` moves them next to the base.
    """
    reference = next(base.parameters(), None)
    on_meta = reference is not None and reference.device.type == "meta"
    return dict(device=torch.device("meta") if on_meta else None, dtype=torch.float32)


class MMATunerLayer(BaseTunerLayer):
    """Set-up shared by the tuner layers of both methods; concrete layers also subclass `nn.Module`."""

    def _init_tuner_layer(self, base_layer: nn.Module, adapter_name: str) -> None:
        """The state every `BaseTunerLayer` needs: base layer, active adapter, merge and disable flags."""
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())

    def _finish_update(self, adapter_name: str, config: PeftConfig) -> None:
        """Call at the end of `update_layer`: move the new parameters to the base's device, refresh `requires_grad`."""
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device | None, Any]:
        """The base's device, and no dtype: PEFT would cast the adapters to the base's dtype when it moves them
        (`low_cpu_mem_usage` loading moves them after their values are in), which on a bf16 base rounds fp32 weights
        that `_cast_adapter_dtype` then casts back up. Their dtype is `_cast_adapter_dtype`'s alone. A wrapped module
        without a `weight` (an attention block) gives the device of its first parameter."""
        device, _ = super()._get_base_layer_device_and_dtype(base_layer)
        if device is None:
            reference = next(base_layer.parameters(), None)
            device = reference.device if reference is not None else None
        return device, None


BASE_FIELDS = ("base_num_layers", "base_hidden_size")


def check_base_size(config: PeftConfig, model: nn.Module) -> None:
    """Raise `ValueError` if `config` was made for a base of another depth or width.

    Both configs carry `base_num_layers` and `base_hidden_size`, filled when an adapter is first attached (once every
    check passed) and saved with it, so that loading onto the wrong base fails before any module is replaced.
    """
    num_layers, width = model.config.num_hidden_layers, model.config.hidden_size
    if config.base_num_layers not in (None, num_layers) or config.base_hidden_size not in (None, width):
        made = f"{config.base_num_layers} layers of width {config.base_hidden_size}"
        raise ValueError(
            reused_config_message(config, BASE_FIELDS, made, f"{num_layers} layers of width {width}")
            or f"This adapter was made for a base with {made}; the model has {num_layers} layers of width {width}. "
            "Load it onto the base model it was trained on."
        )


FILLED_AT_INJECTION = "_mma_filled_at_injection"  # on a config object (not a field): the fields injection filled


def fill_for_base(config: PeftConfig, **values: Any) -> None:
    """Write what injection derives from the base (`base_*`, LaVIN's image token) into `config`, as PEFT fills
    `target_modules` into the caller's object, remembering which fields were unset (filled, not given or loaded)."""
    filled = config.__dict__.setdefault(FILLED_AT_INJECTION, set())
    for name, value in values.items():
        if getattr(config, name) is None:
            filled.add(name)
        setattr(config, name, value)


@contextmanager
def config_kept_on_error(config: PeftConfig) -> Iterator[None]:
    """Where the block raises, put back every field of `config` and `fill_for_base`'s record as they were before
    it: a failed injection leaves the caller's config object as it was."""
    fields = dict(vars(config))
    filled = set(fields.get(FILLED_AT_INJECTION, ()))
    try:
        yield
    except BaseException:
        vars(config).clear()
        vars(config).update(fields)
        if FILLED_AT_INJECTION in fields:
            vars(config)[FILLED_AT_INJECTION] = filled
        raise


def reused_config_message(config: PeftConfig, names: Sequence[str], filled: str, needed: str) -> str | None:
    """The error for a config object whose `names` an earlier `get_peft_model` filled in for another base (None if
    they were given or loaded): PEFT keeps the caller's object in the model, so one object cannot describe two
    bases."""
    if not set(names) <= config.__dict__.get(FILLED_AT_INJECTION, set()):
        return None
    return (
        f"This config object was filled in for a base with {filled} by an earlier `get_peft_model`; this model has "
        f"{needed}. Pass each base a config of its own (a new one, or `copy.deepcopy` of one not yet attached)."
    )


def unused_image_side_zero(modules: Sequence[nn.Module]) -> torch.Tensor | None:
    """0 · Σ(trainable parameters of `modules`), for a step without images under `torch.distributed`; else None.

    DistributedDataParallel expects every rank to use the same parameters at every step. A rank whose batch has no
    image would leave the image side (visual bridge, projector, encoder adapters) unused, so the methods add this
    exact zero to their input instead: the parameters are used and get zero gradients.
    """
    return unused_parameters_zero([p for module in modules for p in module.parameters()])


def unused_parameters_zero(params: Sequence[nn.Parameter]) -> torch.Tensor | None:
    """0 · Σ(those of `params` that require grad) under `torch.distributed` while gradients are recorded, else None:
    what a forward adds where it leaves trainable parameters unused (DistributedDataParallel needs them used)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized() and torch.is_grad_enabled()):
        return None
    params = [p for p in params if p.requires_grad]
    return torch.stack([p.sum() for p in params]).sum() * 0.0 if params else None


def _under(key: str, prefixes: set[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


class MMATunerMixin:
    """Mixed into each method's `BaseTuner` subclass, before `BaseTuner` in the bases."""

    prefix: str

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """`…<prefix><role>.<adapter>[.rest]` → `…<prefix><role>[.rest]`; a pure per-key function (PEFT reuses it
        in reverse on load)."""
        pattern = rf"(^|\.)({re.escape(cls.prefix)}[A-Za-z0-9_]+)\.{re.escape(adapter_name)}(?=\.|$)"
        return re.sub(pattern, r"\1\2", key)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Files saved before 2026-12-05 kept the adapter's name in the keys of roles with capitals in their names
        (V2's `…lora_A.<name>.weight`), which then loaded under that name alone: those keys lose it here."""
        old = re.compile(rf"(^|\.)({re.escape(cls.prefix)}[A-Za-z0-9_]*[A-Z][A-Za-z0-9_]*)\.[^.]+(?=\.[^.]+$)")
        state_dict = {old.sub(r"\1\2", key): value for key, value in state_dict.items()}
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        frozen = {name for name, module in model.named_modules() if isinstance(module, VisionBackbone)}
        adapter_parts = {
            f"{name}.{attr}"
            for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer) and _under(name, frozen)
            for attr in (*module.adapter_layer_names, *module.other_param_names)
        }
        return {k: v for k, v in selected.items() if not _under(k, frozen) or _under(k, adapter_parts)}

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Put `new_module` in place of `child` and move its adapter weights to the base weights' device.

        PEFT's default copies `child.weight`, which attention and norm wrappers do not have (§2.2); meta tensors
        (under `low_cpu_mem_usage`) are left where they are.
        """
        setattr(parent, child_name, new_module)
        base = new_module.get_base_layer() if isinstance(new_module, BaseTunerLayer) else child
        reference = next((p for p in base.parameters() if p.device.type != "meta"), None)
        if reference is None:
            return
        for name, module in new_module.named_modules():
            leaf = next(module.children(), None) is None
            if leaf and self.prefix in name and not any(p.device.type == "meta" for p in module.parameters()):
                module.to(reference.device)

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        """Before injection: keep 4-bit bitsandbytes weights in their portable layout on the CPU."""
        keep_bnb_cpu_layout(model)
        super()._prepare_model(peft_config, model)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """PEFT's `set_requires_grad`, extended to the model-level modules the tuner holds (visual bridge,
        projector, modality embedding) and the adapters inside frozen encoders, which PEFT's walk of `self.model`
        does not reach. An encoder's own weights stay frozen."""
        super().set_requires_grad(adapter_names, requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for attr, container in vars(self)["_modules"].items():
            if not attr.startswith(self.prefix) or not isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                continue
            for name in names & set(container.keys()):
                item = container[name]
                if isinstance(item, VisionBackbone):
                    set_requires_grad(item, adapter_names=[name], requires_grad=requires_grad)
                else:
                    item.requires_grad_(requires_grad)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's convention for every weight of `adapter_name`, the model-level parts (visual bridge, projector,
        modality embedding) included: fp32 with `autocast_adapter_dtype` (PEFT's default), else the base model's
        dtype, as PEFT's own methods leave them. Frozen encoders keep theirs."""
        base = self.model.get_input_embeddings().weight.dtype
        dtype = torch.float32 if autocast_adapter_dtype or not base.is_floating_point else base
        for module in self.modules():
            if isinstance(module, BaseTunerLayer):
                containers = [getattr(module, name) for name in module.adapter_layer_names]
            elif module is self:
                containers = [c for attr, c in self._modules.items() if attr.startswith(self.prefix)]
            else:
                continue
            for container in containers:
                if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in container:
                    continue
                item = container[adapter_name]
                if isinstance(item, nn.Parameter) and item.is_floating_point() and item.dtype != dtype:
                    container[adapter_name] = nn.Parameter(item.detach().to(dtype), requires_grad=item.requires_grad)
                elif isinstance(item, nn.Module) and not isinstance(item, VisionBackbone):
                    item.to(dtype)

    @contextmanager
    def others_trainability_kept(self: BaseTuner) -> Iterator[None]:
        """Put back, after the block, the `requires_grad` of every adapter parameter that exists before it.

        PEFT's injection ends with a `set_adapter` that sets every adapter's parameters by whether it is active, and
        `set_adapter` here reaches the model-level parts too; adding an adapter must leave the others' as the user
        left them (PEFT's own methods do), also where it fails. Parameters the block creates keep what it gave them."""
        flags = {p: p.requires_grad for name, p in self.named_parameters() if self.prefix in name}
        try:
            yield
        finally:
            for param, flag in flags.items():
                param.requires_grad_(flag)

    def _check_adapter_names(self: BaseTuner, names: str | Sequence[str] | None) -> None:
        """A `ValueError` naming the adapters where a name is none of them (raised before anything changes)."""
        names = [names] if isinstance(names, str) else list(names or [])
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter {unknown[0]!r} does not exist; the adapters are {sorted(self.peft_config)}.")

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's `delete_adapter`, which also drops `adapter_name` from every container the tuner itself holds
        (`<prefix><role>` dicts, encoders). Where the deleted adapter was active, PEFT's layers make the adapter
        that takes its place trainable; its model-level parts (visual bridge, projector, modality embedding) follow
        through `set_adapter`."""
        was_active = adapter_name in self.active_adapters
        super().delete_adapter(adapter_name)
        self._delete_model_level_adapter(adapter_name)
        if was_active and self.active_adapters:
            self.set_adapter(self.active_adapters)

    def _delete_model_level_adapter(self: BaseTuner, adapter_name: str) -> None:
        """Drop `adapter_name` from every container the tuner itself holds (`<prefix><role>` dicts, encoders)."""
        for attr, value in list(vars(self)["_modules"].items()):
            ours = attr.startswith(self.prefix) or attr == BACKBONE_ATTR
            if ours and isinstance(value, (nn.ModuleDict, nn.ParameterDict)):
                if adapter_name in value:
                    del value[adapter_name]


def keep_bnb_cpu_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights on the CPU, and undo a repacking that already happened.

    On CPUs with AVX512-BF16, `bnb.nn.Linear4bit` repacks its weight in place at its first inference forward
    (`quant_state.packing_format_for_cpu`, absmax rounded to bf16) and nothing undoes it: PEFT's dequantization then
    reads a wrong weight (a merge folds into garbage), and training forwards take a kernel with no autograd, so
    gradients silently stop there (bitsandbytes issue #2078 is the same bug in `.to()`). We turn the repacking off
    for every 4-bit layer of `model` (a CPU-only speed-up; GPUs never repack) and restore repacked weights; those
    keep their bf16-rounded absmax (within 2⁻⁷ of the largest weight in tests).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or not getattr(state, "packing_format_for_cpu", False):
            continue
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        nested = state.original_nested
        module.weight.data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
        if not nested:  # the inverse leaves absmax transposed to (in/block, out) in bf16 (bitsandbytes 0.50)
            state.absmax = state.absmax.T.reshape(-1).float()
        module.weight.quant_state = state
