"""`--device meta`: build the base and every variant on the meta device (no memory, no timing) to validate a preset.

Checks on a machine without the accelerator that every configuration attaches to the preset's shapes, and reports
the parameter counts. Merged variants are skipped: folding needs real weights.
"""

from __future__ import annotations

from typing import Any

import torch

from .common import count_parameters
from .models import MODELS, Preset, build_base, build_model


def dry_validate(preset: Preset, dtype: torch.dtype) -> dict[str, Any]:
    """{"base_params": N, "trainable_params": {model key: n}, "skipped": [...]} for `preset` on the meta device."""
    meta = torch.device("meta")
    base = build_base(preset, meta, dtype)
    out: dict[str, Any] = {
        "base_params": sum(p.numel() for p in base.parameters()),
        "trainable_params": {},
        "skipped": [],
    }
    for key in MODELS:
        if key.endswith("_merged"):
            out["skipped"].append(key)
            continue
        model = build_model(key, base, preset)
        out["trainable_params"][key] = count_parameters(model)
        del model
    return out
