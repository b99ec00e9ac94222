"""Both methods, with images, on a CUDA device: the CPU's numbers in fp32, bf16 training, merging and generation.

Skipped where torch sees no CUDA device (CI has none); on a GPU machine: `python -m pytest -q tests/test_cuda.py`.
4-bit and 8-bit bases on CUDA are covered by `test_quantized.py`, which runs on every device it finds.
"""

from __future__ import annotations

import pytest
import torch
from conftest import config_for, greedy_without_cache, tiny_llama, train_steps
from peft import PeftModel, get_peft_model

from peft_mma import LaVINConfig
from peft_mma.data import ImageTokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIGS = {"v2": lambda: config_for("v2-image"), "lavin": lambda: config_for("lavin-image")}
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [1, 30, 40, 50, 60, 70, 80, 90]])
PIXELS = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))


def build(method: str, device: str, dtype: torch.dtype | None = None):
    """A tiny GQA LLaMA with randomly initialised (non-identity) adapters.

    Without `dtype`: injected on the CPU in fp32 and then moved to `device`, so every device gets the same weights.
    With `dtype`: as users do it, the base is moved to `device` in `dtype` first and then injected.
    """
    base = tiny_llama("gqa", "sdpa")
    if dtype is not None:
        base = base.to(device=device, dtype=dtype)
    torch.manual_seed(1)
    model = get_peft_model(base, CONFIGS[method]())
    return model.to(device).eval()


def inputs(model) -> dict[str, torch.Tensor]:
    """IDS and PIXELS on the model's device and in its dtype; for LaVIN, each image's placeholders after BOS."""
    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    ids, config = IDS, model.peft_config["default"]
    if isinstance(config, LaVINConfig):
        ids = ImageTokens.from_config(config).expand(IDS, bos_token_id=1)["input_ids"]
    return {"input_ids": ids.to(device), "pixel_values": PIXELS.to(device, dtype)}


def logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs(model), **kwargs)
    return out.logits.float().cpu()


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 matmuls in full precision, so that CUDA and CPU agree to float32 rounding."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize("method", list(CONFIGS))
def test_cuda_fp32_matches_cpu(method):
    """Every injected module (adapters, gates, router, projector or bridge, encoder) moves with `.to("cuda")`."""
    cpu, cuda = logits(build(method, "cpu")), logits(build(method, "cuda"))
    assert cpu.abs().max() > 0
    torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_bf16_training_changes_adapters_only_and_reloads(method, tmp_path):
    model = build(method, "cuda", torch.bfloat16)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all("mma_" in n for n in trainable)
    batch = inputs(model)
    losses = train_steps(model, {**batch, "labels": batch["input_ids"]}, 6)
    model.eval()
    assert losses[-1] < losses[0], losses
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items()), "a frozen base weight changed"
    unchanged = [n for n, p in trainable.items() if torch.equal(params[n], p)]
    assert not unchanged, f"no update reached {unchanged[:3]}"

    trained = logits(model)
    model.save_pretrained(tmp_path)
    base = tiny_llama("gqa", "sdpa").to("cuda", torch.bfloat16)
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.equal(logits(reloaded), trained)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_bf16_merge_and_cached_generation(method):
    """Merged logits equal unmerged ones to bf16 rounding, and cached greedy generation is greedy decoding by full
    forwards without a cache."""
    model = build(method, "cuda", torch.bfloat16)
    unmerged = logits(model)
    if method == "lavin":  # LaVIN folds one modality: the image path for these image samples
        model.base_model.merge_adapter(modality="image")
    else:
        model.merge_adapter()
    merged = logits(model)
    model.unmerge_adapter()
    restored = logits(model)
    scale = unmerged.abs().max()
    assert (merged - unmerged).abs().max() <= 0.05 * scale
    assert (restored - unmerged).abs().max() <= 0.05 * scale

    batch = inputs(model)
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=True)
    assert cached.shape == (2, batch["input_ids"].shape[1] + 5)
    uncached = greedy_without_cache(model, {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}, 5)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_bf16_base_keeps_its_dtype_and_device(method):
    """Injection on a CUDA bf16 base creates everything on that device without moving the base: trained parameters
    in fp32 (PEFT's `autocast_adapter_dtype`), the frozen ones (base, encoder) in bf16."""
    base = tiny_llama("gqa", "sdpa").to("cuda", torch.bfloat16)
    weights = {n: p.data_ptr() for n, p in base.named_parameters()}
    model = get_peft_model(base, CONFIGS[method]())
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    moved = [n for n, p in model.base_model.model.named_parameters() if n in weights and p.data_ptr() != weights[n]]
    assert not moved, moved[:3]
