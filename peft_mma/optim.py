"""An optimizer for the methods' parameters with the visual path at its own learning rate.

The visual path maps a frozen encoder's features into the LLM: LaVIN's projector W₁, W₂ (`lavin_mma.md` §4) and
LLaMA-Adapter V2's visual bridge (`llama_adapter_v2.md` §3). It starts from random weights, while every other
adapter starts as the identity (zero up-paths, unit scales, zero gates). In a short run at one learning rate the
projector is what lags: LaVIN on the scene questions of the README reaches 0.79 held-out accuracy after 180 steps
at lr 2e-3, and 0.93 with the projector at 10 × that (`benchmarks/README.md`, "The visual path's learning rate").
In the manner of PEFT's `create_loraplus_optimizer`:

    optimizer = create_mma_optimizer(model, torch.optim.AdamW, lr=2e-3, visual_lr_ratio=10, betas=(0.9, 0.95))
    trainer = Trainer(model=model, args=args, optimizers=(optimizer, None), ...)  # the Trainer adds the schedule

The official recipes train every parameter at one learning rate (`visual_lr_ratio=1`, the default) over 20 epochs.
`weight_decay` applies to matrices only, not to one-dimensional tensors (biases, gains, scales, gates), as timm's
`param_groups_weight_decay` does in the official LaVIN recipe (`lavin_mma.md` §6).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

VISUAL_PATH = ("mma_lavin_proj_in", "mma_lavin_proj_out", "mma_adapter_v2_visual")  # module names of the path


def visual_path_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of `model`'s visual path: those below a module named in `VISUAL_PATH` (LaVIN's
    projector, V2's bridge; not LaVIN's encoder adapters, which start as the identity)."""
    return [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and any(part in VISUAL_PATH for part in name.split("."))
    ]


def param_groups(
    model: nn.Module,
    lr: float,
    visual_lr_ratio: float = 1.0,
    weight_decay: float = 0.0,
    visual: Iterable[nn.Parameter] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups of `model`'s trainable parameters: the visual path (`visual`, by default
    `visual_path_parameters(model)`) at lr × `visual_lr_ratio`, the rest at lr; `weight_decay` on matrices only.
    Raises `ValueError` before building anything for a non-positive lr or ratio, a model with nothing to train, or
    a ratio other than 1 for a model without a visual path."""
    if not lr > 0 or not visual_lr_ratio > 0:
        raise ValueError(
            f"`lr` and `visual_lr_ratio` must be positive; got lr={lr}, visual_lr_ratio={visual_lr_ratio}."
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("The model has no trainable parameters; attach an adapter with `get_peft_model` first.")
    chosen = {id(p) for p in (visual_path_parameters(model) if visual is None else visual)}
    if visual_lr_ratio != 1.0 and not chosen:
        raise ValueError(
            f"`visual_lr_ratio`={visual_lr_ratio} sets the learning rate of the visual path, and this model has none "
            f"(no trainable module named one of {VISUAL_PATH}); configure a `vision_model`, or leave the ratio at 1."
        )
    groups = []
    for is_visual in (False, True):
        for decays in (True, False):
            params = [p for p in trainable if (id(p) in chosen) == is_visual and (p.ndim >= 2) == decays]
            if params:
                rate = lr * visual_lr_ratio if is_visual else lr
                groups.append({"params": params, "lr": rate, "weight_decay": weight_decay if decays else 0.0})
    return groups


def create_mma_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    visual_lr_ratio: float = 1.0,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """`optimizer_cls` over `param_groups(model, lr, visual_lr_ratio, weight_decay)`; `kwargs` (betas, eps, fused,
    …) go to the optimizer."""
    return optimizer_cls(param_groups(model, lr, visual_lr_ratio, weight_decay), lr=lr, **kwargs)
