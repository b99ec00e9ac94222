"""Checks shared by both methods: which base models are supported, and how their decoder is laid out."""

from __future__ import annotations

from torch import nn

SUPPORTED_MODEL_TYPES = ("llama",)


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


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a `LlamaForCausalLM` (or a bare `LlamaModel`)."""
    inner = getattr(model, "model", model)
    return inner.layers
