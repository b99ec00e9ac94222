"""A small ViT pretrained on procedural scenes: a pretrained `vision_model` for machines that cannot download one.

Both papers read a pretrained CLIP encoder; with a randomly initialised one, what a method learns depends on the
draw of the encoder (issue 13). CLIP learnt to see from images paired with their captions; this encoder learns the
same way from `peft_mma.data.scenes`: every caption is a few slots (kind, shape, colour, size, position, count, the
colours of the larger and smaller shape, the printed word), and the encoder's class token, through one linear head
per slot, is trained to predict the words of each slot (a parallel captioner):

    loss = Σ_slot CE(W_slot · CLS(x), caption slot)        (slots that a scene lacks are left out)

With `patch_heads=True` the mean of the patch tokens gets heads of its own, M_slot · mean_i PATCH_i(x), whose
cross-entropies join the sum (CLS and PATCH_i: the final-norm outputs at the class token and at patch i). The class
token is what LaVIN reads (after every block); the patch tokens are what LLaMA-Adapter V2's bridge reads, and its
queries start by attending about evenly to all of them. With the class-token heads alone nothing trains the patch
tokens, and their mean carries where the shape is at a quarter to a half of the class token's share of the spread
(`benchmarks.visual_probe`); the mean-token heads make the tokens themselves carry the scene, as a CLIP trained on
web data has them do, and V2 then learns where the shape is (README, "Teach SmolLM2 to see").

It never sees a question or an answer letter. The heads are thrown away; what is kept is a timm ViT (`ARCH` with
`MODEL_ARGS`: 64 px images, 16 px patches, so 16 patch tokens and a class token, 4 blocks of width 128, 0.89M
parameters) saved with timm's `save_for_hf` into the user cache, so that `vision_model=scene_encoder()` (a timm
``local-dir:`` name) with `vision_pretrained=True` loads it in both methods like any other timm encoder. Its pixel
values are the scene tensors as they are, in [0, 1] (mean 0, std 1 in its data config).

Recipe (`report.json` of each build): AdamW lr 1e-3, 4,000 steps of 32 fresh scenes, 183 s on a 2-core AMD EPYC
(sharded, below; 281-334 s unsharded on one thread). Many small steps beat fewer large ones at equal compute (1,200 ×
32 reached a lower loss than 300 × 128), 16 px patches beat 8 px ones (4× cheaper steps, so 4× the steps: the probe's
shape accuracy went from 0.71 to 0.98), and the patches' position embedding starts as fixed 2-D sin-cos values (at
8 px patches the probe's position accuracy was 0.53-0.96 over four runs without it, 1.0 with it).

Each step's batch is cut into `SHARDS` shards (equal where the batch size allows) whose gradients are computed at
once, each on a Python thread of its own running `BUILD_THREADS` torch thread, and summed in a fixed order: a 2-core
machine does a step in 46 ms instead of 70-84, and the weights do not depend on how many cores there are (a rebuild
was bitwise the first). On torch's own threads they would: the CPU's reductions, and so the weights, depend on the
thread count (seed 0 built with one torch thread and with two differs by up to 0.18 in a weight), and a folder's name
promises one encoder per seed and step count.

The folder is keyed by `VERSION` (bumped whenever the scenes or the recipe change), the seed and the step count;
`build_scene_encoder` writes it once and `scene_encoder` reuses it after. Version 3 was the first built on a pinned
thread count (one thread, unsharded; 2 was briefly the patch-head default, at a5734ff), version 4 the first sharded.
``python -m peft_mma.vision.scene_encoder`` builds it and prints the report.
"""

from __future__ import annotations

import functools
import json
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..data.cache import cache_root, complete, set_aside, write_folder
from ..data.scenes import KINDS, SLOTS, draw_scenes, scene_dataset
from ..utils import warmup_cosine

VERSION = 6  # 6: shapes drawn at whole-pixel centres (splits shared pixel-identical scenes); 5: split order-free
BUILD_THREADS = 1  # torch threads per shard
SHARDS = 2  # each step's batch, in parts whose gradients are computed at once on threads of their own
ARCH = "vit_tiny_patch16_224"
MODEL_ARGS = dict(img_size=64, patch_size=16, embed_dim=128, depth=4, num_heads=4, num_classes=0)
IMAGE_SIZE = 64
DEFAULT_STEPS = 4000
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
IGNORE = -100
READINGS = ("class", "patches")  # what slot heads can read: the class token, the mean of the patch tokens


def scene_encoder_dir(seed: int = 0, steps: int = DEFAULT_STEPS, patch_heads: bool = False) -> Path:
    patches = "-patches" if patch_heads else ""
    return cache_root() / f"scene-vit-v{VERSION}{patches}-seed{seed}-steps{steps}"


def scene_encoder(seed: int = 0, steps: int = DEFAULT_STEPS, progress: bool = False, patch_heads: bool = False) -> str:
    """The timm name (``"local-dir:<folder>"``) of the scene encoder for `seed`, built on first use.

    Pass it as `vision_model` with `vision_pretrained=True` to `LaVINConfig` or `LlamaAdapterV2Config`.
    `patch_heads=True`: slot heads on the mean of the patch tokens too, so that the tokens LLaMA-Adapter V2's bridge
    reads carry the scene (a folder of its own).
    """
    folder = scene_encoder_dir(seed, steps, patch_heads)
    if folder.exists() and not complete(folder):
        set_aside(folder)  # a copy cut short: built again
    if not folder.exists():
        build_scene_encoder(folder, seed=seed, steps=steps, progress=progress, patch_heads=patch_heads)
    return f"local-dir:{folder}"


def _targets(scenes: list, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Per slot, the index of each scene's value, or `IGNORE` where the scene has no such slot: {slot: (B,)}."""
    return {
        slot: torch.tensor(
            [values.index(s.attributes[slot]) if slot in s.attributes else IGNORE for s in scenes], device=device
        )
        for slot, values in SLOTS.items()
    }


def _create(seed: int) -> nn.Module:
    """The untrained encoder: timm's init, with the position embedding of the patches set to fixed 2-D sin-cos
    values (as MAE starts) so that where a patch lies is readable from the first step; it stays trainable."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(ARCH, pretrained=False, **MODEL_ARGS)
    side, width = model.patch_embed.grid_size[0], model.embed_dim
    with torch.no_grad():
        model.pos_embed[0, model.num_prefix_tokens :] = _sincos_2d(side, width)
    return model


def _sincos_2d(side: int, width: int) -> torch.Tensor:
    """(side², width): patch (row r, column c) gets [sin(c·ω), cos(c·ω), sin(r·ω), cos(r·ω)],
    ω_k = 10000^(-k / (width/4))."""
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4))  # (width/4,)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    angles_c, angles_r = cols.reshape(-1, 1) * omega, rows.reshape(-1, 1) * omega  # (side², width/4)
    return torch.cat([angles_c.sin(), angles_c.cos(), angles_r.sin(), angles_r.cos()], dim=1)


def pretrain(
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int | None = None,
    progress: bool = False,
    patch_heads: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the encoder for `steps` steps of `batch_size` (default `BATCH_SIZE`) fresh "train"-split scenes, its
    class token read by slot heads (and the mean of its patch tokens too, with `patch_heads`); returns (encoder,
    training report)."""
    batch_size = BATCH_SIZE if batch_size is None else batch_size
    if steps < 1 or batch_size < 1:
        raise ValueError(f"`steps` and `batch_size` must be >= 1, got {steps} and {batch_size}.")
    model = _create(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        heads = nn.ModuleDict(
            {
                reading: nn.ModuleDict(
                    {slot: nn.Linear(model.num_features, len(values)) for slot, values in SLOTS.items()}
                )
                for reading in READINGS[: 2 if patch_heads else 1]
            }
        )
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.98), weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps))
    rng = random.Random(f"scene-encoder-{seed}")
    generator = torch.Generator().manual_seed(seed)
    bar = _progress(steps, "pretraining the scene encoder") if progress else None
    started, cpu_started, losses = time.perf_counter(), time.process_time(), []
    model.train()
    with ThreadPoolExecutor(max_workers=SHARDS) as pool:
        for _ in range(steps):
            scenes = draw_scenes(rng, KINDS, batch_size, "train", IMAGE_SIZE)
            images, targets = torch.stack([scene.draw(generator) for scene in scenes]), _targets(scenes)
            counts = slot_counts(targets)
            shard = functools.partial(_shard_gradients, model, heads, params, counts=counts)
            shard_targets = [{slot: t.tensor_split(SHARDS)[i] for slot, t in targets.items()} for i in range(SHARDS)]
            results = list(pool.map(shard, images.tensor_split(SHARDS), shard_targets))
            for i, param in enumerate(params):
                param.grad = functools.reduce(torch.add, [grads[i] for _, grads in results])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(sum(loss for loss, _ in results))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    if bar is not None:
        bar.close()
    model.eval().requires_grad_(False)
    report = {
        "steps": steps,
        "batch_size": batch_size,
        "shards": SHARDS,
        "seed": seed,
        "patch_heads": patch_heads,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "train_wall_s": round(time.perf_counter() - started, 1),
        "train_cpu_s": round(time.process_time() - cpu_started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    return model, report


def readings(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the slot heads read, after the final norm: the class token and the mean of the patch tokens,
    {"class": (B, C), "patches": (B, C)}."""
    tokens = model.forward_features(images)  # (B, 1 + N, C)
    return {
        "class": model.forward_head(tokens, pre_logits=True),
        "patches": tokens[:, model.num_prefix_tokens :].mean(1),
    }


def slot_loss(
    read: dict[str, torch.Tensor],
    heads: nn.ModuleDict,
    targets: dict[str, torch.Tensor],
    counts: dict[str, int] | None = None,
) -> torch.Tensor:
    """Σ_slot Σ_reading CE(heads[reading][slot](read[reading]), targets[slot]) over the readings `heads` has,
    scenes without the slot left out: each slot's cross-entropies summed and divided by `counts[slot]`, the scenes
    with the slot in the whole batch when these are a shard of it (so that the shards' losses sum to the batch's),
    by default in these; a slot no scene has adds 0."""
    counts = slot_counts(targets) if counts is None else counts
    total = torch.zeros(())
    for slot in SLOTS:
        for r in heads:
            ce = F.cross_entropy(heads[r][slot](read[r]), targets[slot], ignore_index=IGNORE, reduction="sum")
            total = total + ce / max(counts[slot], 1)
    return total


def slot_counts(targets: dict[str, torch.Tensor]) -> dict[str, int]:
    """Per slot, how many scenes of `targets` have it."""
    return {slot: int((target != IGNORE).sum()) for slot, target in targets.items()}


def _shard_gradients(
    model: nn.Module,
    heads: nn.ModuleDict,
    params: list[nn.Parameter],
    images: torch.Tensor,
    targets: dict[str, torch.Tensor],
    counts: dict[str, int],
) -> tuple[float, tuple[torch.Tensor, ...]]:
    """One shard's share of the batch loss and its gradients for `params` (returned, not accumulated, so that the
    shards can run at once and be summed in a fixed order)."""
    loss = slot_loss(readings(model, images), heads, targets, counts)
    return float(loss.detach()), torch.autograd.grad(loss, params)


def _progress(total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step")


def build_scene_encoder(
    folder: str | Path, seed: int = 0, steps: int = DEFAULT_STEPS, progress: bool = False, patch_heads: bool = False
) -> dict[str, Any]:
    """Pretrain, probe and save the encoder into `folder` (timm's `save_for_hf` layout plus `report.json`); the folder
    appears whole or not at all, so concurrent first uses are safe. Returns the report."""
    folder = Path(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)  # the same weights on every machine (module docstring)
    try:
        model, report = pretrain(seed=seed, steps=steps, progress=progress, patch_heads=patch_heads)
        report["linear_probe"] = linear_probe(model, seed=seed)
    finally:
        torch.set_num_threads(threads)
    model.pretrained_cfg = dict(
        model.pretrained_cfg,
        input_size=(3, IMAGE_SIZE, IMAGE_SIZE),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        crop_pct=1.0,
        interpolation="bilinear",
        num_classes=0,
    )

    def write(staging: Path) -> None:
        timm.models.save_for_hf(model, staging, model_args=MODEL_ARGS, safe_serialization=True)
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    write_folder(folder, write, marker="model.safetensors")
    return report


@torch.no_grad()
def class_token_features(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The normalised class token of each image: (N, C)."""
    model.eval()
    chunks = [
        model.forward_head(model.forward_features(images[i : i + batch_size]), pre_logits=True)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


def linear_probe(model: nn.Module, seed: int = 0, train_size: int = 2048, eval_size: int = 512) -> dict[str, float]:
    """Held-out accuracy of a linear classifier per caption slot on the frozen class token: fit on "train"-split
    scenes, scored on "eval"-split scenes (disjoint), both drawn with `seed` + 100 (not the pretraining stream)."""
    probed = slot_probe(lambda images: class_token_features(model, images), seed, train_size, eval_size)
    return {slot: result["accuracy"] for slot, result in probed.items()}


def slot_probe(
    features: Callable[[torch.Tensor], torch.Tensor], seed: int = 0, train_size: int = 2048, eval_size: int = 512
) -> dict[str, dict[str, float]]:
    """Per caption slot, how plainly `features` (images (N, 3, H, W) → (N, D)) carry it: `accuracy`, held-out, of a
    linear classifier on the standardised features (fit on "train"-split scenes, scored on "eval"-split scenes, both
    drawn with `seed` + 100); and `variance_share`, the share of the features' spread over the training scenes that
    the slot's class means explain, Σ_c n_c ‖μ_c − μ‖² / Σ_i ‖x_i − μ‖² (the scenes with the slot), unstandardised:
    how much of what a downstream layer first sees is that slot."""
    train = scene_dataset(train_size, seed=seed + 100, split="train", image_size=IMAGE_SIZE)
    held_out = scene_dataset(eval_size, seed=seed + 100, split="eval", image_size=IMAGE_SIZE)
    x_train = features(torch.stack([s["image"] for s in train])).flatten(1)
    x_eval = features(torch.stack([s["image"] for s in held_out])).flatten(1)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    z_train, z_eval = (x_train - mean) / std, (x_eval - mean) / std  # the probe's input; the share reads x
    targets_train, targets_eval = (_targets([s["scene"] for s in samples]) for samples in (train, held_out))
    results = {}
    for slot, values in SLOTS.items():
        y_train, y_eval = targets_train[slot], targets_eval[slot]
        fit, score = y_train != IGNORE, y_eval != IGNORE
        probe = _fit_probe(z_train[fit], y_train[fit], len(values))
        hits = probe(z_eval[score]).argmax(-1) == y_eval[score]
        results[slot] = {
            "accuracy": float(hits.float().mean()),
            "variance_share": variance_share(x_train[fit], y_train[fit]),
        }
    return results


def variance_share(x: torch.Tensor, y: torch.Tensor) -> float:
    """Σ_c n_c ‖μ_c − μ‖² / Σ_i ‖x_i − μ‖² for features x (N, D) and classes y (N,): 1 when the class decides each
    feature vector, 0 when the class means coincide."""
    centred = x - x.mean(0)
    between = sum(centred[y == c].mean(0).square().sum() * (y == c).sum() for c in y.unique())
    return float(between / centred.square().sum())


def _fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 100) -> nn.Linear:
    """Multinomial logistic regression (L2 1e-3) by L-BFGS."""
    probe = nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), y) + 1e-3 * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return probe.requires_grad_(False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m peft_mma.vision.scene_encoder [--seed N] [--steps N] [--patch-heads]``: build the encoder (or
    find it in the cache) and print its folder and report: training time and the held-out linear-probe accuracy per
    slot."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--patch-heads", action="store_true", help="slot heads on the mean of the patch tokens too")
    args = parser.parse_args(argv)
    name = scene_encoder(seed=args.seed, steps=args.steps, progress=True, patch_heads=args.patch_heads)
    report = json.loads((Path(name.removeprefix("local-dir:")) / "report.json").read_text())
    print(name)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
