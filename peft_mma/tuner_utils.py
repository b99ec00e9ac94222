"""Tuner machinery shared by both methods, on top of PEFT's `BaseTuner` (spec `peft_plugin_api.md` §2).

* Model-level modules (the visual bridge, the modality embedding) live on the tuner in containers keyed by adapter
  name, as VeRA's shared state does; PEFT saves every tuner attribute but `model`.
* The frozen `VisionBackbone` lives on the tuner too, so that `.to()` and `.half()` move it, but its weights are
  left out of the adapter state dict (only adapter containers of tuner layers inside it are kept).
* Adapter containers may be nested (`<prefix>visual.<adapter>.blocks.0.attn.qkv.weight`), so the adapter name is
  removed right after the container name, wherever it is in the key.
"""

from __future__ import annotations

import re

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .vision.backbone import VisionBackbone


def _under(key: str, prefixes: set[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


class MMATunerMixin:
    """Mixed into each method's `BaseTuner` subclass, before `BaseTuner` in the bases."""

    prefix: str

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """`…<prefix><role>.<adapter>[.rest]` → `…<prefix><role>[.rest]`; a pure per-key function (PEFT reuses it
        in reverse on load)."""
        pattern = rf"(^|\.)({re.escape(cls.prefix)}[a-z0-9_]+)\.{re.escape(adapter_name)}(?=\.|$)"
        return re.sub(pattern, r"\1\2", key)

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
            if self.prefix in name and not any(p.device.type == "meta" for p in module.parameters(recurse=False)):
                module.to(reference.device)

    def _delete_model_level_adapter(self: BaseTuner, adapter_name: str) -> None:
        """Drop `adapter_name` from every container the tuner itself holds (`<prefix><role>` dicts)."""
        for attr, value in list(vars(self)["_modules"].items()):
            if attr.startswith(self.prefix) and isinstance(value, (nn.ModuleDict, nn.ParameterDict)):
                if adapter_name in value:
                    del value[adapter_name]

