"""An optimizer for the methods' parameters with the visual path (and V2's gates) at their own learning rates.

The visual path maps a frozen encoder's features into the LLM: LaVIN's projector W₁, W₂ (`lavin_mma.md` §4) and
LLaMA-Adapter V2's visual bridge (`llama_adapter_v2.md` §3). It starts from random weights, while every other
adapter starts as the identity (zero up-paths, unit scales, zero gates). In a short run at one learning rate the
projector is what lags: LaVIN on the scene questions of the README reaches 0.79 held-out accuracy after 180 steps
at lr 2e-3, and 0.93 with the projector at 10 × that (`benchmarks/README.md`, "The visual path's learning rate").
In the manner of PEFT's `create_loraplus_optimizer`:

    optimizer = create_mma_optimizer(model, torch.optim.AdamW, lr=2e-3, visual_lr_ratio=10, betas=(0.9, 0.95))
    trainer = Trainer(model=model, args=args, optimizers=(optimizer, None), ...)  # the Trainer adds the schedule

LLaMA-Adapter V2's gates g (`llama_adapter_v2.md` §2) start at zero and scale every prompt term by tanh(g). Adam
moves a parameter by about its learning rate per step whatever the size of its gradient, so a gate can open no
faster than that; `gate_lr_ratio` gives the gates their own rate. Measured on the README's scene questions (V2 with
fusion "all", 150 steps at lr 2e-3), the gates do not press against that limit: they stay near zero (mean |tanh g|
0.014 at one rate, with a one-block bridge; 0.06 at 10 ×), and at 10 × held-out accuracy falls from 0.74 to 0.51
(`benchmarks/README.md`, "What V2's visual path is not held back by"). So the default is 1.

The official recipes train every parameter at one learning rate (both ratios 1, the default) over 20 epochs.
`weight_decay` applies to matrices only, not to one-dimensional tensors (biases, gains, scales), as timm's
`param_groups_weight_decay` does in the official LaVIN recipe (`lavin_mma.md` §6), and to V2's gates and the LoRA
checkpoints' `new_gate`, which the official V2 code keeps as (1, H, 1, 1) and (1, 1, 1, 1) tensors and so decays
(`llama_adapter_v2.md` §4; ours are (H,) and (1,)).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

VISUAL_PATH = ("mma_lavin_proj_in", "mma_lavin_proj_out", "mma_adapter_v2_visual")  # module names of the path
GATES = ("mma_adapter_v2_gate",)  # V2's zero-init prompt gates (not `mma_adapter_v2_gate_scale`, which starts at one)
# one-dimensional here, four-dimensional in the official V2 code, whose weight decay skips only 1-D tensors and biases
DECAYED_VECTORS = (*GATES, "mma_adapter_v2_gate_scale")


def _named(model: nn.Module, modules: tuple[str, ...]) -> list[nn.Parameter]:
    """The trainable parameters of `model` below a module named in `modules`."""
    return [p for name, p in model.named_parameters() if p.requires_grad and set(name.split(".")) & set(modules)]


def visual_path_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of `model`'s visual path: those below a module named in `VISUAL_PATH` (LaVIN's
    projector, V2's bridge; not LaVIN's encoder adapters, which start as the identity)."""
    return _named(model, VISUAL_PATH)


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable zero-init prompt gates of `model` (`GATES`: LLaMA-Adapter V2's g, one per head and layer)."""
    return _named(model, GATES)


def param_groups(
    model: nn.Module,
    lr: float,
    visual_lr_ratio: float = 1.0,
    weight_decay: float = 0.0,
    visual: Iterable[nn.Parameter] | None = None,
    gate_lr_ratio: float = 1.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups of `model`'s trainable parameters: the visual path (`visual`, by default
    `visual_path_parameters(model)`) at lr × `visual_lr_ratio`, V2's gates (`gate_parameters`) at lr ×
    `gate_lr_ratio`, the rest at lr; `weight_decay` on matrices and on `DECAYED_VECTORS` (V2's gates and `new_gate`)
    only. Raises `ValueError` before building anything for a non-positive lr or ratio, a model with nothing to
    train, or a ratio other than 1 for a model without the parameters it sets."""
    if not lr > 0 or not visual_lr_ratio > 0 or not gate_lr_ratio > 0:
        raise ValueError(
            f"`lr`, `visual_lr_ratio` and `gate_lr_ratio` must be positive; got lr={lr}, "
            f"visual_lr_ratio={visual_lr_ratio}, gate_lr_ratio={gate_lr_ratio}."
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("The model has no trainable parameters; attach an adapter with `get_peft_model` first.")
    visual_ids = {id(p) for p in (visual_path_parameters(model) if visual is None else visual)}
    gate_ids = {id(p) for p in gate_parameters(model)} - visual_ids
    decayed_ids = {id(p) for p in _named(model, DECAYED_VECTORS)}
    if visual_lr_ratio != 1.0 and not visual_ids:
        raise ValueError(
            f"`visual_lr_ratio`={visual_lr_ratio} sets the learning rate of the visual path, and this model has none "
            f"(no trainable module named one of {VISUAL_PATH}); configure a `vision_model`, or leave the ratio at 1."
        )
    if gate_lr_ratio != 1.0 and not gate_ids:
        raise ValueError(
            f"`gate_lr_ratio`={gate_lr_ratio} sets the learning rate of LLaMA-Adapter V2's prompt gates, and this "
            f"model has none (no trainable {GATES[0]}); use it with a V2 adapter that has prompts, or leave it at 1."
        )

    def role(p: nn.Parameter) -> str:  # at ratio 1 the gates stay in the base groups
        if id(p) in visual_ids:
            return "visual"
        return "gate" if gate_lr_ratio != 1.0 and id(p) in gate_ids else "base"

    rates = {"base": lr, "visual": lr * visual_lr_ratio, "gate": lr * gate_lr_ratio}
    groups = []
    for kind in rates:
        for decays in (True, False):
            params = [p for p in trainable if role(p) == kind and (p.ndim >= 2 or id(p) in decayed_ids) == decays]
            if params:
                groups.append({"params": params, "lr": rates[kind], "weight_decay": weight_decay if decays else 0.0})
    return groups


def create_mma_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    visual_lr_ratio: float = 1.0,
    gate_lr_ratio: float = 1.0,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """`optimizer_cls` over `param_groups(model, lr, visual_lr_ratio, weight_decay, gate_lr_ratio=gate_lr_ratio)`;
    `kwargs` (betas, eps, fused, …) go to the optimizer."""
    groups = param_groups(model, lr, visual_lr_ratio, weight_decay, gate_lr_ratio=gate_lr_ratio)
    return optimizer_cls(groups, lr=lr, **kwargs)
