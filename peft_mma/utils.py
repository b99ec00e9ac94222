"""Checks shared by both methods (which base models are supported, how their decoder is laid out), the dtype cast
their autograd nodes share, and the learning-rate schedule of the package's own training loops."""

from __future__ import annotations

import math

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama",)


def cast_to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`t` in `dtype`: itself (no op dispatched) when it already is, or None."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def apply_in_autocast_dtype(node: type[torch.autograd.Function], x: torch.Tensor, *args):
    """`node.apply(x, *args)` computed as `torch.autocast` computes a matmul: where autocast is on for x's device, x
    is cast to autocast's dtype (bf16 for `Trainer(bf16=True)`) and the node runs with autocast off, so that its
    forward, and the backward autograd runs later without autocast, see one dtype; elsewhere it is `node.apply`.

    Our nodes compute in x's dtype and cast their parameters to it. Under autocast their ops would otherwise come out
    of it in mixed dtypes (a bf16 matmul beside an fp32 saved weight), and backward, outside autocast, would fail on
    them. The result is in autocast's dtype, as a `Linear`'s under autocast is; x's gradient goes back to x's dtype
    through the recorded cast."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return node.apply(x, *args)
    with torch.autocast(device, enabled=False):
        return node.apply(cast_to(x, torch.get_autocast_dtype(device)), *args)


def check_supported_model(model: nn.Module) -> None:
    """Raise `TypeError` unless `model` is a LLaMA-architecture causal LM (spec `peft_plugin_api.md` §4)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        name = type(model).__name__
        raise TypeError(
            f"peft_mma adapts LLaMA-architecture decoders (`config.model_type` in {list(SUPPORTED_MODEL_TYPES)}, "
            f"e.g. `LlamaForCausalLM` for LLaMA 1/2/3 and SmolLM2); got {name} with model_type={model_type!r}."
        )


def check_has_image(has_image, batch: int) -> None:
    """Raise `ValueError` unless `has_image` is a 1-D bool tensor with one flag per sample of the batch."""
    if not isinstance(has_image, torch.Tensor) or has_image.ndim != 1 or has_image.dtype != torch.bool:
        raise ValueError(f"`has_image` must be a 1-D bool tensor (one flag per sample); got {has_image!r}.")
    if len(has_image) != batch:
        raise ValueError(f"`has_image` has {len(has_image)} flags for a batch of {batch} sequences.")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a `LlamaForCausalLM` (or a bare `LlamaModel`)."""
    inner = getattr(model, "model", model)
    return inner.layers


# config flag → (decoder sub-module, its linears) of a LLaMA layer
BIAS_GROUPS = {
    "attention_bias": ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
    "mlp_bias": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}


def declare_merged_biases(model: nn.Module) -> None:
    """After a merge that created biases: give every linear of the group a bias (zeros where it had none) and set
    the config's `attention_bias` / `mlp_bias`, so that vanilla transformers saves and reloads the same numbers."""
    for flag, (parent, names) in BIAS_GROUPS.items():
        linears = [getattr(getattr(layer, parent), n) for layer in decoder_layers(model) for n in names]
        if getattr(model.config, flag, False) or all(linear.bias is None for linear in linears):
            continue
        made = next(linear.bias for linear in linears if linear.bias is not None)  # dtype and device of a bias
        for linear in linears:
            if linear.bias is None:  # `out_features`: a 4-bit weight is packed, its shape is not the layer's
                zeros = torch.zeros(linear.out_features, dtype=made.dtype, device=made.device)
                linear.bias = nn.Parameter(zeros, requires_grad=False)
        setattr(model.config, flag, True)


def warmup_cosine(step: int, steps: int) -> float:
    """Learning-rate factor at `step` of `steps`: linear warm-up over 5 % of the steps, then cosine to 0 (for
    `torch.optim.lr_scheduler.LambdaLR`)."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
