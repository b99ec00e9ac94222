"""LaVIN-7B ScienceQA recipe on one accelerator, projected from measured step times; training memory at 4 × 512.

The recipe (spec `lavin_mma.md` §5, §6): 12.7k training samples × 20 epochs at an effective batch of 32, with
dynamic padding (each micro-batch padded to its longest sample), visual tokens (n = 6) added to image samples. Step
times T are measured per micro-batch size m at several padded lengths L, once text-only and once with an image in
every row, and interpolated in L. A micro-batch with k ≥ 1 images costs the image time, since the encoder runs on
all m rows (a text-only row gets a zero image):

    T(L, k) = T_text(L) if k = 0, else T_image(L)

The epochs are then simulated batch by batch with sample lengths drawn from `ASSUMPTIONS` (no ScienceQA offline),
in two arrangements: shuffled (the `Trainer`'s default sampler), and grouped by modality and length
(transformers' `LengthGroupedSampler` with `peft_mma.data.collator.grouping_lengths`), where nearly every
micro-batch holds one modality and little padding. `--reproject` projects the step times of an earlier run again,
measuring nothing. Memory: peak allocated bytes of one LaVIN image+text train step at batch 4 × 512 with activation
checkpointing, in the benchmark dtype and with the decoder's linears in 4-bit NF4 (bitsandbytes).
"""

from __future__ import annotations

import gc
import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from torch import nn

from .common import git_commit, median, peak_memory, share_weights_copy, synchronize, timed
from .models import Preset, image_inputs, lavin_config

# ScienceQA, LaVIN's prompt ("Question/Context/Options/Response:" + "The answer is X. BECAUSE: lecture solution").
# Word counts from the ScienceQA paper (Lu et al. 2022: question 12.1, lecture 125, solution 47 words on average;
# 48.7 % of questions have an image), ≈ 1.3 LLaMA tokens per word, plus the template. Not measured here.
ASSUMPTIONS: dict[str, Any] = {
    "train_samples": 12726,
    "epochs": 20,
    "micro_batch": 4,
    "image_fraction": 0.487,
    "length_distribution": "lognormal",
    "length_median_tokens": 270,
    "length_sigma": 0.4,
    "length_min_tokens": 64,
    "max_seq_len": 512,
    "visual_tokens": 6,
    "padding": "dynamic: each micro-batch padded to its longest sample; every epoch shuffled, or grouped by "
    "modality and length (`ARRANGEMENTS`)",
    "optimizer_step": "AdamW on every micro-batch (the recipe steps every 8; the extra steps are counted, not saved)",
    "source": "ScienceQA paper averages (words) × 1.3 tokens/word; LaVIN's prompt format; not measured offline",
}
GOAL_HOURS = 1.4
EFFECTIVE_BATCH = 32  # spec lavin_mma.md §6: 2 GPUs × micro-batch 4 × accumulation 4
GOAL_MEMORY_GB = {"checkpointing": 20.0, "4bit_checkpointing": 8.0}


def sample_lengths(count: int, rng: random.Random, a: dict[str, Any] = ASSUMPTIONS) -> list[tuple[int, bool]]:
    """(text tokens, has image) for `count` samples drawn from the assumed distribution."""
    samples = []
    for _ in range(count):
        length = int(rng.lognormvariate(math.log(a["length_median_tokens"]), a["length_sigma"]))
        image = rng.random() < a["image_fraction"]
        cap = a["max_seq_len"] - (a["visual_tokens"] if image else 0)
        samples.append((max(a["length_min_tokens"], min(cap, length)), image))
    return samples


def interpolate(points: dict[int, float], length: float) -> float:
    """Piecewise-linear T(L) through the measured points; below them the shortest point's time, above them the
    longest point's time scaled by L / L_max (never negative, whatever the noise between the points)."""
    xs = sorted(points)
    if length <= xs[0]:
        return points[xs[0]]
    if length >= xs[-1]:
        return points[xs[-1]] * length / xs[-1]
    i = next(j for j, x in enumerate(xs) if x >= length)
    x0, x1 = xs[i - 1], xs[i]
    return points[x0] + (points[x1] - points[x0]) * (length - x0) / (x1 - x0)


ARRANGEMENTS = ("shuffled", "grouped")  # how an epoch's samples go into batches (`project_hours`)


def epoch_order(
    keys: list[int], arrangement: str, group: int, rng: random.Random, generator: torch.Generator
) -> list[int]:
    """The sample indices of one epoch in batch order: "shuffled", a random permutation (the HF `Trainer`'s
    default sampler); "grouped", transformers' `get_length_grouped_indices` over `keys` for batches of `group`, as
    its `LengthGroupedSampler` (`train_sampling_strategy="group_by_length"`) orders them with the keys of
    `peft_mma.data.collator.grouping_lengths`: one modality per batch, similar lengths."""
    if arrangement == "shuffled":
        order = list(range(len(keys)))
        rng.shuffle(order)
        return order
    if arrangement == "grouped":
        from transformers.trainer_pt_utils import get_length_grouped_indices

        return get_length_grouped_indices(keys, group, generator=generator)
    raise ValueError(f"arrangement must be one of {ARRANGEMENTS}, got {arrangement!r}")


def project_hours(
    text: dict[int, float],
    image: dict[int, float],
    a: dict[str, Any] = ASSUMPTIONS,
    seed: int = 0,
    micro_batch: int | None = None,
    effective_batch: int | None = None,
    optimizer_s: float = 0.0,
    arrangement: str = "shuffled",
) -> dict[str, Any]:
    """Simulate every epoch's micro-batches with dynamic padding; return hours and the padding overhead.

    `text`/`image` map a padded length to the time of one micro-batch of `micro_batch` samples (`a["micro_batch"]`
    by default), text-only and with an image in every row; `image`'s lengths are the text's, its measured
    sequences `a["visual_tokens"]` longer (`_step`). A micro-batch with any image costs the image time at its
    longest total length less the visual tokens: the vision encoder runs on each of its rows (a text-only row gets
    a zero image). The samples, in `arrangement`'s
    order (`epoch_order`), go `effective_batch` at a time into one optimizer step that costs `optimizer_s` more,
    each step's samples cut into micro-batches; by default every micro-batch is a step whose optimizer time
    `text`/`image` already include."""
    from peft_mma.data.collator import grouping_lengths

    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    samples = sample_lengths(a["train_samples"], rng, a)
    totals = [length + (a["visual_tokens"] if image else 0) for length, image in samples]  # placeholders included
    keys = grouping_lengths(totals, [image for _, image in samples])
    batch = micro_batch or a["micro_batch"]
    group = effective_batch or batch
    seconds, padded, mixed, count = 0.0, 0, 0, 0
    for _ in range(a["epochs"]):
        order = epoch_order(keys, arrangement, group, rng, generator)
        for first in range(0, len(order), group):
            seconds += optimizer_s
            step = order[first : first + group]
            for start in range(0, len(step), batch):
                chunk = step[start : start + batch]
                images = sum(samples[i][1] for i in chunk)
                longest = max(totals[i] for i in chunk)  # the padded length, placeholders included
                key = longest - a["visual_tokens"] if images else longest  # `image` is keyed by the text's length
                seconds += interpolate(image if images else text, key) * len(chunk) / batch
                padded += longest * len(chunk)
                mixed += 0 < images < len(chunk)
                count += 1
    mean_length = sum(length for length, _ in samples) / len(samples)
    return {
        "hours": seconds / 3600,
        "arrangement": arrangement,
        "padding_overhead": padded / (sum(totals) * a["epochs"]) - 1,
        "mixed_micro_batches": mixed / count,  # share of micro-batches with both text-only and image samples
        "mean_text_tokens": mean_length,
        "goal_hours": GOAL_HOURS,
        "met": seconds / 3600 <= GOAL_HOURS,
    }


def project_sweep(rows: dict[int, dict[str, Any]], optimizer_s: float) -> dict[str, Any]:
    """Each micro-batch's projection at the effective batch, shuffled and grouped (`row["projection"]`, keyed by
    arrangement), and the fastest (micro-batch, arrangement) of those that ran."""
    best: tuple[float, int, str] | None = None
    for m, row in rows.items():
        if "error" in row:
            continue
        row["projection"] = {
            arrangement: project_hours(
                row["text"],
                row["image"],
                micro_batch=m,
                effective_batch=EFFECTIVE_BATCH,
                optimizer_s=optimizer_s,
                arrangement=arrangement,
            )  # fmt: skip
            for arrangement in ARRANGEMENTS
        }
        for arrangement, projected in row["projection"].items():
            if best is None or projected["hours"] < best[0]:
                best = (projected["hours"], m, arrangement)
    out: dict[str, Any] = {"micro_batches": rows, "optimizer_s": optimizer_s, "best_micro_batch": None}
    if best is not None:
        out |= {"best_hours": best[0], "best_micro_batch": best[1], "best_arrangement": best[2]}
    return out


# ---------------------------------------------------------------- measurement


def _lavin(base: nn.Module, preset: Preset, share: bool = True) -> nn.Module:
    """LaVIN with images on `base`: on a weight-sharing copy, or on `base` itself (quantized bases)."""
    return get_peft_model(share_weights_copy(base) if share else base, lavin_config(preset, vision=True))


def _step(model: nn.Module, ids: torch.Tensor, pixels: torch.Tensor | None, optimizer) -> None:
    """One training step on `ids` (B, S); with `pixels`, each sample's n image placeholders go in front: (B, n + S)."""
    batch = {"input_ids": ids} if pixels is None else image_inputs(model, ids, pixels)
    model.train()
    model(**batch, labels=batch["input_ids"], use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_times(model: nn.Module, preset: Preset, lengths: list[int], rounds: int, device) -> dict[str, dict]:
    """Median step time at each text length, text-only and with images, interleaved round-robin."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab, size = model.config.vocab_size, preset.image_size
    pixels = torch.rand(preset.batch, 3, size, size, device=device)
    jobs = [(length, with_image) for length in lengths for with_image in (False, True)]
    ids = {length: torch.randint(3, vocab, (preset.batch, length), device=device) for length in lengths}
    times: dict[tuple[int, bool], list[float]] = {job: [] for job in jobs}
    for r in range(rounds + 1):  # the first round warms up
        for length, with_image in jobs:
            images = pixels if with_image else None
            wall, _, _ = timed(lambda: _step(model, ids[length], images, optimizer), device)  # noqa: B023
            if r:
                times[(length, with_image)].append(wall)
    return {
        kind: {length: median(times[(length, kind == "image")]) for length in lengths} for kind in ("text", "image")
    }


def memory_at(model: nn.Module, preset: Preset, total_len: int, device, checkpointing: bool) -> dict[str, Any]:
    """Peak allocated bytes of one image+text LaVIN step at batch × `total_len` (visual tokens included)."""
    n = model.peft_config["default"].num_image_tokens
    ids = torch.randint(3, model.config.vocab_size, (preset.batch, total_len - n), device=device)
    pixels = torch.rand(preset.batch, 3, preset.image_size, preset.image_size, device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        _step(model, ids, pixels, optimizer)  # optimizer state exists before the measured step
        memory = peak_memory(lambda: _step(model, ids, pixels, optimizer), device)
    finally:
        if checkpointing:
            model.gradient_checkpointing_disable()
    peak, before = memory["peak_bytes"], memory["before_bytes"]
    return {
        "batch": preset.batch,
        "total_len": total_len,
        "checkpointing": checkpointing,
        "peak_gb": None if peak is None else peak / 1e9,
        "before_step_gb": None if before is None else before / 1e9,  # weights, adapters, optimizer state
    }


def quantize_4bit_(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Replace every decoder Linear by a bitsandbytes NF4 `Linear4bit` in place, freeing the dense weights."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                device = child.weight.device
                quantized = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    quant_type="nf4",
                    device="meta",
                )
                quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                setattr(parent, name, quantized.to(device))
                del child
        gc.collect()


def measure_projection(
    base: nn.Module,
    preset: Preset,
    device: torch.device,
    dtype: torch.dtype,
    lengths: list[int] | None = None,
    rounds: int = 3,
) -> dict[str, Any]:
    """Step times → projected hours; memory at 4 × 512 with checkpointing, then (quantizing `base` in place)
    in 4-bit. `base` is unusable in its original precision afterwards."""
    lengths = lengths or ([128, 256, 384, 512] if preset.name == "7b" else [preset.seq_len // 2, preset.seq_len])
    total_len = 512 if preset.name == "7b" else preset.seq_len
    model = _lavin(base, preset)
    times = step_times(model, preset, lengths, rounds, device)
    out: dict[str, Any] = {"assumptions": ASSUMPTIONS, "step_time_s": times, "lengths": lengths, "rounds": rounds}
    out["projection"] = project_hours(times["text"], times["image"])
    out["memory"] = {
        "no_checkpointing": memory_at(model, preset, total_len, device, checkpointing=False),
        "checkpointing": memory_at(model, preset, total_len, device, checkpointing=True),
    }
    del model
    gc.collect()
    try:
        quantize_4bit_(base, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        synchronize(device)
        model = _lavin(base, preset, share=False)
        out["memory"]["4bit_checkpointing"] = memory_at(model, preset, total_len, device, checkpointing=True)
    except Exception as error:  # bitsandbytes without a backend for this device
        out["memory"]["4bit_checkpointing"] = {"error": f"{type(error).__name__}: {error}"}
    for key, goal in GOAL_MEMORY_GB.items():
        entry = out["memory"][key]
        entry["goal_gb"] = goal
        entry["met"] = entry.get("peak_gb") is not None and entry["peak_gb"] <= goal
    return out


# ---------------------------------------------------------------- the recipe at its effective batch, on one device


def forward_backward(
    model: nn.Module, ids: torch.Tensor, pixels: torch.Tensor | None, prefix: nn.Module | None = None
) -> Callable[[], None]:
    """One micro-batch's forward and backward, gradients accumulating as under gradient accumulation. `model` is
    LaVIN with images, or the frozen base (the floor, gradients to its input embeddings; with `prefix`, the frozen
    encoder's n tokens in front of image samples)."""
    from .speed import Inputs, _floor_forward, _peft_forward

    inputs = Inputs(ids, ids[:, :1], pixels, None)
    if hasattr(model, "peft_config"):
        forward = _peft_forward("lavin_image" if pixels is not None else "lavin_text", model, inputs)
    else:
        forward = _floor_forward(model, inputs, prefix if pixels is not None else None)

    def call() -> None:
        model.train()
        forward().backward()

    return call


def micro_batch_times(
    model: nn.Module,
    preset: Preset,
    micro_batches: list[int],
    lengths: list[int],
    rounds: int,
    device: torch.device,
    prefix: nn.Module | None = None,
) -> dict[int, dict[str, Any]]:
    """Per micro-batch size m: the median forward+backward time at each text length, text-only and with m images,
    and the peak memory of the longest length with images. A size that runs out of memory ends the sweep."""
    vocab, size = model.config.vocab_size, preset.image_size
    out: dict[int, dict[str, Any]] = {}
    for m in micro_batches:
        pixels = torch.rand(m, 3, size, size, device=device)
        calls = {
            (length, kind): forward_backward(
                model, torch.randint(3, vocab, (m, length), device=device), pixels if kind == "image" else None, prefix
            )
            for length in lengths
            for kind in ("text", "image")
        }
        try:
            times: dict[tuple[int, str], list[float]] = {job: [] for job in calls}
            for r in range(rounds + 1):  # the first round warms up (and compiles)
                for job, call in calls.items():
                    wall, _, _ = timed(call, device)
                    if r:
                        times[job].append(wall)
            memory = peak_memory(calls[(lengths[-1], "image")], device)
        except torch.OutOfMemoryError:
            out[m] = {"error": "out of memory"}
            break
        finally:
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        out[m] = {kind: {length: median(times[(length, kind)]) for length in lengths} for kind in ("text", "image")}
        out[m]["peak_gb"] = None if memory["peak_bytes"] is None else memory["peak_bytes"] / 1e9
    return out


def optimizer_seconds(model: nn.Module, rounds: int, device: torch.device) -> float:
    """Median time of one AdamW step over the trainable parameters, gradients present (fused on CUDA, as the HF
    `Trainer`'s default there)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    times = []
    for r in range(rounds + 1):
        for p in params:
            p.grad = torch.zeros_like(p)
        wall, _, _ = timed(optimizer.step, device)
        if r:
            times.append(wall)
    optimizer.zero_grad(set_to_none=True)
    return median(times)


def measure_recipe(
    base: nn.Module,
    preset: Preset,
    device: torch.device,
    dtype: torch.dtype,
    micro_batches: list[int],
    lengths: list[int],
    rounds: int = 3,
    compile_mode: str | None = None,
) -> dict[str, Any]:
    """The LaVIN recipe at its effective batch of 32 on this one device: for every micro-batch m (accumulation
    32 / m) the projected hours of LaVIN and of the frozen floor, shuffled and grouped (`project_sweep`), and the
    fastest that ran."""
    from .common import compile_layers
    from .models import FrozenVisualPrefix

    if compile_mode not in (None, "layers"):
        raise ValueError(f"compile_mode must be None or 'layers', got {compile_mode!r}")
    out: dict[str, Any] = {
        "assumptions": ASSUMPTIONS,
        "effective_batch": EFFECTIVE_BATCH,
        "lengths": lengths,
        "rounds": rounds,
        "compile_mode": compile_mode,
        "goal_hours": GOAL_HOURS,
    }
    models = {"lavin": _lavin(base, preset), "floor": share_weights_copy(base)}
    for name, model in models.items():
        # the floor's frozen encoder, built after LaVIN's sweep: LaVIN's peak memory would count it (0.6 GB at 7B)
        prefix = FrozenVisualPrefix(preset, base.config.hidden_size, device, dtype) if name == "floor" else None
        if compile_mode == "layers":
            compile_layers(model, dynamic=True)  # one graph for every micro-batch size and padded length
        sweep = micro_batch_times(model, preset, micro_batches, lengths, rounds, device, prefix)
        optimizer_s = optimizer_seconds(model, rounds, device) if name == "lavin" else 0.0
        out[name] = project_sweep(sweep, optimizer_s)
        del model
        models[name] = None
        gc.collect()
    lavin = out["lavin"]
    out["met"] = lavin.get("best_hours") is not None and lavin["best_hours"] <= GOAL_HOURS
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse
    import sys
    import time

    from .common import RESULTS_DIR, compile_stats, load_average, machine_info, write_json
    from .models import PRESETS, build_base

    parser = argparse.ArgumentParser(description="The LaVIN-7B ScienceQA recipe at effective batch 32 on one device")
    parser.add_argument("--preset", choices=("7b", "tiny"), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512], help="padded text lengths")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--compile",
        nargs="?",
        const="layers",
        default=None,
        choices=("layers",),
        help="each decoder layer through torch.compile with dynamic shapes",
    )
    parser.add_argument(
        "--reproject",
        metavar="JSON",
        default=None,
        help="measure nothing: project the step times of an earlier run's JSON again (this simulation's batching)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    command = "python -m benchmarks.projection " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.reproject:
        if args.out is None:
            parser.error("--reproject needs --out (the measured JSON stays as it is)")
        result = reproject(json.loads(Path(args.reproject).read_text()), args.reproject, command)
    else:
        if any(EFFECTIVE_BATCH % m for m in args.micro_batches):
            parser.error(f"--micro-batches must divide the effective batch {EFFECTIVE_BATCH}: {args.micro_batches}")
        device, preset = torch.device(args.device), PRESETS[args.preset]
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        started = time.time()
        torch.manual_seed(0)
        base = build_base(preset, device, dtype)
        result = {
            "benchmark": "recipe_projection",
            "command": command,
            "preset": preset.name,
            "dtype": str(dtype).removeprefix("torch."),
            "machine": machine_info(device),
        }
        result |= measure_recipe(
            base, preset, device, dtype, args.micro_batches, args.lengths, args.rounds, args.compile
        )
        if args.compile:
            result["compile_stats"] = compile_stats()
        result["load_after"] = load_average()
        result["elapsed_s"] = round(time.time() - started, 1)
    suffix = "_compiled" if result.get("compile_mode") else ""
    path = write_json(result, args.out or RESULTS_DIR / f"recipe_{result['preset']}_{args.device}{suffix}.json")
    for name in ("lavin", "floor"):
        for m, row in result[name]["micro_batches"].items():
            hours = {k: f"{v['hours']:.2f} h" for k, v in row.get("projection", {}).items()}
            print(
                f"{name:5s} micro-batch {m:3d} × accumulation {EFFECTIVE_BATCH // m:2d}: "
                f"{hours or 'n/a'}, peak {row.get('peak_gb')} GB"
            )
    lavin = result["lavin"]
    print(
        f"LaVIN best: {lavin.get('best_hours')} h at micro-batch {lavin['best_micro_batch']}, "
        f"{lavin.get('best_arrangement')} (goal {GOAL_HOURS} h); wrote {path}"
    )
    return result


def reproject(measured: dict[str, Any], source: str, command: str) -> dict[str, Any]:
    """An earlier recipe run (`measure_recipe`'s JSON) projected again from its measured step times, by this
    module's simulation; its machine, commit and times are kept, and its own projections left out."""
    result = {k: v for k, v in measured.items() if k not in ("lavin", "floor", "met", "command")}
    result |= {"command": command, "measured_by": measured["command"], "reprojected_from": source}
    result["reprojected_at_commit"] = git_commit()
    result |= {"assumptions": ASSUMPTIONS, "effective_batch": EFFECTIVE_BATCH, "goal_hours": GOAL_HOURS}
    for name in ("lavin", "floor"):
        rows = {}
        for m, row in measured[name]["micro_batches"].items():
            row = {k: v for k, v in row.items() if k != "projection"}
            for kind in ("text", "image"):
                if kind in row:
                    row[kind] = {int(length): t for length, t in row[kind].items()}
            rows[int(m)] = row
        result[name] = project_sweep(rows, measured[name].get("optimizer_s", 0.0))
    lavin = result["lavin"]
    result["met"] = lavin.get("best_hours") is not None and lavin["best_hours"] <= GOAL_HOURS
    return result


if __name__ == "__main__":
    main()
