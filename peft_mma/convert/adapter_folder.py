"""The PEFT side of a conversion: the adapter's expected parameters, and the folder `PeftModel.from_pretrained` reads.

The expected parameters come from the adapter itself, built on the meta device on the base's config (no weights
are read or allocated, and the frozen vision encoder is never downloaded): its trainable parameters are exactly what
`save_pretrained` writes. The converted tensors are turned into the saved key layout by PEFT's own
`get_peft_model_state_dict`, so the folder is what `save_pretrained` would have written: `adapter_config.json` and
`adapter_model.safetensors`. The folder appears complete or not at all.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from .checkpoint import BaseModel, ConversionError, OfficialCheckpoint, check_architecture, load_checkpoint, read_base
from .mapping import Rule, map_checkpoint

FILES = ("adapter_config.json", SAFETENSORS_WEIGHTS_NAME, "README.md")  # the card: `peft_mma.card`


def adapter_skeleton(base: BaseModel, config: PeftConfig) -> PeftModel:
    """The adapter `config` on a meta-device copy of the base; `config` is not modified."""
    skeleton_config = copy.deepcopy(config)
    if hasattr(skeleton_config, "vision_pretrained"):
        skeleton_config.vision_pretrained = False  # the frozen encoder is neither saved nor needed here
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base.config)
    try:
        return get_peft_model(model, skeleton_config)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"The converted configuration does not fit the base {base.label}: {error}") from error


def expected_parameters(skeleton: PeftModel) -> dict[str, torch.Size]:
    """PEFT parameter name → shape of every tensor the adapter saves (its trainable parameters)."""
    return {name: p.shape for name, p in skeleton.named_parameters() if p.requires_grad}


@dataclass
class ConversionSummary:
    """What a conversion wrote."""

    family: str
    preset: str
    out: Path
    tensors_read: int
    tensors_written: int
    parameters: int
    file_size: int
    frozen_skipped: int

    def __str__(self) -> str:
        lines = [
            f"Converted {self.family} checkpoint (preset {self.preset}) into {self.out}",
            f"  checkpoint tensors converted: {self.tensors_read}",
            f"  adapter tensors written:      {self.tensors_written}",
            f"  parameters:                   {self.parameters:,}",
            f"  adapter_model.safetensors:    {self.file_size / 2**20:.2f} MiB ({self.file_size:,} bytes)",
        ]
        if self.frozen_skipped:
            lines.append(f"  frozen tensors left out:      {self.frozen_skipped} (encoder / base weights)")
        return "\n".join(lines)


def check_out(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to replace an adapter already in `out` unless `overwrite`, and an `out` that is a file."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ConversionError(f"{str(out)!r} is a file; `out` (--out) names the adapter folder to write.")
    if not overwrite and any((Path(out) / name).exists() for name in FILES):
        raise ConversionError(f"{str(out)!r} already holds an adapter; pass `overwrite=True` (--overwrite).")


def write_adapter(
    skeleton: PeftModel, config: PeftConfig, tensors: dict[str, torch.Tensor], out: str | os.PathLike
) -> tuple[Path, int, int]:
    """Write `config` and the converted `tensors` (PEFT parameter names) as a PEFT adapter folder `out`.

    Returns (folder, number of tensors written, file size in bytes).
    """
    out = Path(out)
    state = {**skeleton.state_dict(), **tensors}
    saved = get_peft_model_state_dict(skeleton, state_dict=state)
    unfilled = sorted(k for k, v in saved.items() if v.device.type == "meta")
    if unfilled:  # `map_checkpoint` checks this first; a mismatch here is a bug
        raise ConversionError(f"Internal error: saved tensors without a value: {unfilled[:5]}.")
    saved = {k: v.detach().cpu().contiguous() for k, v in saved.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(saved, staging / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
        config.save_pretrained(staging, auto_mapping_dict=_auto_mapping(skeleton, config))  # then the card
        out.mkdir(exist_ok=True)
        for name in FILES:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, len(saved), (out / SAFETENSORS_WEIGHTS_NAME).stat().st_size


def _auto_mapping(skeleton: PeftModel, config: PeftConfig) -> dict[str, str] | None:
    """What `PeftModel.save_pretrained` records for configs without a task type (LaVIN), so that
    `AutoPeftModelForCausalLM` finds the base class."""
    if config.task_type is not None:
        return None
    base_class = type(skeleton.base_model.model)
    return {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}


def convert_into_folder(
    checkpoint: OfficialCheckpoint,
    base: BaseModel,
    config: PeftConfig,
    rules: Callable[[PeftModel], list[Rule]],
    *,
    family: str,
    preset: str,
    frozen: list[str],
    out: str | os.PathLike,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionSummary:
    """Map `checkpoint` onto the adapter `config` for `base` with `rules(skeleton)`, check it, write the folder."""
    check_out(out, overwrite)
    skeleton = adapter_skeleton(base, config)
    where = f"the {family} adapter (preset {preset}) on the base {base.label}"
    if getattr(config, "vision_model", None) is not None:
        where += f" with `vision_model`={config.vision_model!r}"
    expected = expected_parameters(skeleton)
    mapped = map_checkpoint(
        checkpoint.tensors, rules(skeleton), expected, frozen=frozen, where=where, progress=progress
    )
    saved_config = skeleton.peft_config["default"]  # as injected (V2 records the base's depth and width)
    if hasattr(config, "vision_pretrained"):
        saved_config.vision_pretrained = config.vision_pretrained
    saved_config.inference_mode = True
    saved_config.base_model_name_or_path = base.path
    folder, written, size = write_adapter(skeleton, saved_config, mapped.tensors, out)
    parameters = sum(t.numel() for t in mapped.tensors.values())
    return ConversionSummary(family, preset, folder, mapped.read, written, parameters, size, len(mapped.frozen))


@dataclass(frozen=True)
class Recipe:
    """What converting one method's official checkpoints takes (`convert/lavin.py`, `convert/llama_adapter_v2.py`)."""

    family: str  # the method's name in messages
    presets: Collection[str]  # the preset names it converts to
    frozen: list[str]  # patterns of base-model tensors a training state dict may carry (read, not written)
    detect_preset: Callable[[OfficialCheckpoint], str]
    architecture: Callable[[OfficialCheckpoint], dict[str, tuple[int, str]]]  # LLaMA sizes the checkpoint implies
    build_config: Callable[[OfficialCheckpoint, BaseModel, str, Mapping[str, Any] | None], PeftConfig]
    rules: Callable[[OfficialCheckpoint, BaseModel, PeftConfig, PeftModel], list[Rule]]


def convert_official(
    recipe: Recipe,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    base: str | os.PathLike | nn.Module,
    out: str | os.PathLike,
    *,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionSummary:
    """Convert an official checkpoint of `recipe`'s method into a PEFT adapter folder for the HF LLaMA `base`.

    Args:
        recipe: the method's `Recipe`.
        checkpoint: the official `.pth` (read with `weights_only=True`), a `.safetensors` file, or a loaded dict.
        base: a Hugging Face LLaMA directory or an in-memory `LlamaForCausalLM`; its shapes are checked.
        out: the folder to write (`adapter_config.json`, `adapter_model.safetensors`).
        preset: one of `recipe.presets`; detected from the checkpoint when `None`.
        overrides: config fields set last (e.g. `vision_pretrained`, `image_token_position`).
        overwrite: replace an adapter already in `out`.
        progress: show a progress bar.

    Returns:
        A `ConversionSummary`; nothing is written when the conversion fails (`ConversionError`).
    """
    loaded, base_model = load_checkpoint(checkpoint), read_base(base)
    preset = preset or recipe.detect_preset(loaded)
    if preset not in recipe.presets:
        raise ConversionError(f"Unknown {recipe.family} preset {preset!r}; choose from {sorted(recipe.presets)}.")
    check_architecture(recipe.architecture(loaded), base_model, recipe.family)
    config = recipe.build_config(loaded, base_model, preset, overrides)
    return convert_into_folder(
        loaded,
        base_model,
        config,
        lambda skeleton: recipe.rules(loaded, base_model, config, skeleton),
        family=recipe.family,
        preset=preset,
        frozen=recipe.frozen,
        out=out,
        overwrite=overwrite,
        progress=progress,
    )
