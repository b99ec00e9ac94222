"""Register the peft_mma methods with PEFT (spec `peft_plugin_api.md` §1).

PEFT 0.21 has no plugin discovery: `register_peft_method` accepts only names that are already members of
`PeftType`, so each method's member is added to the enum at import time, in the `MMA_` namespace that no PEFT
release uses. A saved adapter therefore loads only after `import peft_mma`; PEFT's own loaders raise a bare
`KeyError('MMA_…')` otherwise.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType, register_peft_method


def ensure_peft_type(name: str) -> PeftType:
    """Return `PeftType[name]`, adding the member to PEFT's enum if it is not there yet.

    Works on CPython 3.11+: the member behaves like a native one for attribute and item access, `PeftType(value)`,
    membership in `list(PeftType)`, string equality, hashing, JSON and pickle.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


MMA_ADAPTER_V2 = ensure_peft_type("MMA_ADAPTER_V2")
MMA_LAVIN = ensure_peft_type("MMA_LAVIN")


def register(peft_type: PeftType, config_cls: type, model_cls: type) -> None:
    """Register one method with PEFT, once (a second import or a reload is a no-op)."""
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=peft_type.value.lower(), config_cls=config_cls, model_cls=model_cls)


def register_all() -> None:
    """Register every peft_mma method (called once by `import peft_mma`)."""
    from .lavin import LaVINConfig, LaVINModel
    from .llama_adapter_v2 import LlamaAdapterV2Config, LlamaAdapterV2Model

    register(MMA_ADAPTER_V2, LlamaAdapterV2Config, LlamaAdapterV2Model)
    register(MMA_LAVIN, LaVINConfig, LaVINModel)
