"""Reading the two inputs of a conversion safely: the official checkpoint and the Hugging Face LLaMA base.

* The official checkpoint is read with `torch.load(weights_only=True)` only: tensors, plain containers and
  `argparse.Namespace` (LaVIN saves its training `args` as one, spec `lavin_mma.md` §5). Anything else would need
  pickle to run code and is refused. `.safetensors` files are read as they are.
* The base is a Hugging Face LLaMA directory or an in-memory `LlamaForCausalLM`. From a directory only
  `config.json` and the few tensors a conversion needs (the tuned norms' base weights) are read, so converting for
  a 65B base needs no 65B of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from ..utils import SUPPORTED_MODEL_TYPES

SAFE_GLOBALS = [argparse.Namespace]  # attribute bags: unpickling one runs no code


class ConversionError(ValueError):
    """An official checkpoint that cannot be converted as asked; the message says what and how to fix it."""


@dataclass
class OfficialCheckpoint:
    """The tensors of an official checkpoint (its `model` entry, `module.` prefixes removed) and the rest of it."""

    source: str
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)  # LLaMA-Adapter V2: {'w_bias', 'w_lora', 'lora_rank'}
    args: dict[str, Any] = field(default_factory=dict)  # LaVIN: the training arguments


def load_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Any]) -> OfficialCheckpoint:
    """Read an official checkpoint without executing pickled code.

    Accepts a `.pth`/`.pt`/`.bin` file (`torch.save`), a `.safetensors` file, or an already-loaded mapping, either
    the state dict itself or a dict with the state dict under `model` (both official code bases save that way).
    """
    if isinstance(checkpoint, Mapping):
        return _unwrap(dict(checkpoint), "<in-memory checkpoint>")
    path = Path(checkpoint)
    if not path.is_file():
        raise ConversionError(f"Checkpoint {str(path)!r} does not exist or is not a file.")
    if path.suffix == ".safetensors":
        return _unwrap(load_file(path), str(path))
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        culprit = f" (it contains `{found.group(1)}`)" if found else ""
        raise ConversionError(
            f"Refusing to load {str(path)!r}: reading it needs pickle to run code{culprit}. Checkpoints are read "
            "with `torch.load(weights_only=True)`, which accepts tensors, plain containers and argparse.Namespace "
            "only. If you trust the file, re-save its state dict in a trusted environment, e.g. "
            "`torch.save({'model': ckpt['model']}, 'clean.pth')`."
        ) from None
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"{str(path)!r} holds a {type(loaded).__name__}, not a state dict.")
    return _unwrap(dict(loaded), str(path))


def _unwrap(loaded: dict[str, Any], source: str) -> OfficialCheckpoint:
    state = loaded.get("model") if isinstance(loaded.get("model"), Mapping) else loaded
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ConversionError(f"{source}: the state dict has entries that are not tensors: {not_tensors[:10]}.")
    tensors = {key.removeprefix("module."): value for key, value in state.items()}  # DDP prefix
    extras = {} if state is loaded else loaded
    args = extras.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, Mapping) else {}
    config = extras.get("config") if isinstance(extras.get("config"), Mapping) else {}
    return OfficialCheckpoint(source, tensors, dict(config), dict(args))


@dataclass
class BaseModel:
    """What a conversion needs from the base: its config, a name for messages, and some of its tensors."""

    config: PretrainedConfig
    label: str
    path: str | None
    _read: Callable[[list[str]], dict[str, torch.Tensor]]

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads

    def tensors(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The base tensors `keys` (`LlamaForCausalLM.state_dict()` names)."""
        found = self._read(keys)
        missing = sorted(set(keys) - set(found))
        if missing:
            raise ConversionError(f"The base {self.label} lacks the tensors {missing[:5]}; is it a full LLaMA?")
        return found


def read_base(base: str | os.PathLike | nn.Module) -> BaseModel:
    """A Hugging Face LLaMA directory or an in-memory `LlamaForCausalLM`, checked to be a LLaMA."""
    if isinstance(base, nn.Module):
        config = getattr(base, "config", None)
        label, path = f"{type(base).__name__} (in memory)", getattr(config, "name_or_path", None) or None

        def read(keys: list[str]) -> dict[str, torch.Tensor]:
            state = base.state_dict()
            return {k: state[k].detach().to("cpu", copy=True) for k in keys if k in state}

    else:
        path = str(base)
        if not Path(path, "config.json").is_file():
            raise ConversionError(f"`base`={path!r} is not a Hugging Face model directory (no config.json).")
        config, label = AutoConfig.from_pretrained(path), repr(path)

        def read(keys: list[str]) -> dict[str, torch.Tensor]:
            return _read_from_directory(Path(path), keys)

    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"The base {label} has model_type={model_type!r}; official LLaMA-Adapter V2 and LaVIN checkpoints "
            f"convert onto a LLaMA (`model_type` in {list(SUPPORTED_MODEL_TYPES)})."
        )
    return BaseModel(config, label, path, read)


def _read_from_directory(directory: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Selected tensors of a saved model: sharded or single safetensors, else `pytorch_model*.bin` (weights only)."""
    wanted = set(keys)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({weight_map[k] for k in wanted if k in weight_map})
            break
    else:
        files = [f.name for f in (directory / "model.safetensors", directory / "pytorch_model.bin") if f.is_file()]
    found: dict[str, torch.Tensor] = {}
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(directory / name, framework="pt") as handle:
                found |= {k: handle.get_tensor(k) for k in wanted & set(handle.keys())}
        else:
            state = torch.load(directory / name, map_location="cpu", weights_only=True)
            found |= {k: state[k] for k in wanted & set(state)}
    return found


def check_architecture(found: dict[str, tuple[int, str]], base: BaseModel, family: str) -> None:
    """Raise if the checkpoint's architecture (config field → (value, official key it was read from)) is not the
    base's, naming the base and every mismatching field."""
    mismatches = [
        f"`{name}`: the checkpoint has {value} (from `{key}`), the base has {getattr(base.config, name, None)}"
        for name, (value, key) in found.items()
        if getattr(base.config, name, None) != value
    ]
    if mismatches:
        raise ConversionError(
            f"The {family} checkpoint does not fit the base {base.label}:\n  "
            + "\n  ".join(mismatches)
            + "\nConvert onto the LLaMA the checkpoint was trained on (LLaMA-7B for the 7B releases)."
        )
