"""Training step time, peak training memory and cached greedy generation speed, side by side in one process.

    python -m benchmarks.speed                                   # SmolLM2-135M, CPU, fp32 (the issue's setting)
    python -m benchmarks.speed --preset 7b --device cuda --dtype bf16      # plus the LaVIN-7B projection
    python -m benchmarks.speed --compile                         # train steps under torch.compile, every variant

Every variant is built once on a copy of the base that shares its frozen weights. One warm-up round, then
`--rounds` rounds in which every variant runs once, in an order shuffled per round (round-robin, so load changes
hit all variants alike). Reported: per-variant medians, and the median over rounds of the ratio to the reference
measured in the same round (train: the frozen-base floor; generate: the plain base), for wall and CPU time.

* train step = forward + backward + AdamW step + zero_grad, batch × seq_len random tokens, loss on every token.
  The floor is the frozen base with only the input embeddings' output requiring grad: gradients flow through
  every layer to the inputs, no weight gets one, and its optimizer steps one dummy scalar.
* generate = `generate(do_sample=False, use_cache=True)` of exactly `gen_new` tokens after `gen_prompt` tokens,
  tokens/s = batch × gen_new / wall time (prefill included).
* `--compile`: every variant's model call goes through `torch.compile` (inductor, default mode; the floor's and
  the image reference's too), the optimizer stays eager, and the warm-up round compiles; train steps only unless
  `--kinds` says otherwise, no memory pass. Results go to `speed_<preset>_<device>_compiled.json`, with the targets
  of compiled training. `--compile layers` compiles each decoder layer instead (`common.compile_layers`), every
  variant alike.
* `--compile --kinds generate`: compiled decoding, as the README shows it: `generate(cache_implementation="static")`
  with the forward that `generate` calls (the `LlamaForCausalLM`'s, or each decoder layer's with `--compile
  layers`) through `torch.compile`, the base's alike; results in `speed_<preset>_<device>_compiled_generate.json`,
  with the generation targets.
* image variants (`lavin_image*`) are compared with references that do the unavoidable work of an image
  sample: the same frozen encoder and n visual tokens in front of the text (`floor_image`, `base_image`).
"""

from __future__ import annotations

import argparse
import copy
import gc
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from .common import (
    RESULTS_DIR,
    SavedActivations,
    compile_layers,
    compile_stats,
    count_parameters,
    load_average,
    machine_info,
    median,
    peak_memory,
    raise_recompile_limit,
    timed,
    trainable_parameters,
    write_json,
)
from .models import (
    GEN_VARIANTS,
    IMAGE_REFERENCE,
    IMAGE_VARIANTS,
    MODELS,
    PRESETS,
    REFERENCE,
    TRAIN_VARIANTS,
    FrozenVisualPrefix,
    Preset,
    build_base,
    build_model,
    image_inputs,
)
from .targets import check_targets

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch.compile mode → suffix of a compiled run's result file
COMPILE_MODE_SUFFIX = {None: "", "default": "", "reduce-overhead": "_cudagraphs", "max-autotune": "_max_autotune"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:i], or meta (7b dry validation only)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up round")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 by default: on a shared machine a descheduled OpenMP thread "
        "stalls the other at every barrier (measured: 10-100x outliers with 2)",
    )
    parser.add_argument(
        "--variants", nargs="*", choices=list(MODELS), default=None, help="subset of models to build (default: all)"
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=("train", "generate"),
        default=None,
        help="what to measure (default: both; train alone with --compile)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the (untimed) peak-memory pass")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="only the peak-memory pass of each train step, no timing: results/memory_<preset>_<device>.json",
    )
    parser.add_argument(
        "--projection",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="LaVIN-7B ScienceQA projection and memory at 4 x 512 (default: on for --preset 7b)",
    )
    add_compile_arguments(parser, "train steps (and generate calls, with --kinds generate)")
    add_adamw_argument(parser)
    parser.add_argument("--out", default=None, help="result JSON (default: results/speed_<preset>_<device>.json)")
    args = parser.parse_args(argv)
    check_compile_arguments(parser, args)
    if args.kinds is None:
        args.kinds = ["train"] if args.compile else ["train", "generate"]
    return args


def add_compile_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """`--compile [model|layers]` and `--compile-mode`, as `speed` and `profile` take them."""
    parser.add_argument(
        "--compile",
        nargs="?",
        const="model",
        default=None,
        choices=("model", "layers"),
        help=f"{what} under torch.compile (inductor): every model call (`--compile`, `--compile model`), or every "
        "decoder layer, PyTorch's regional compilation (`--compile layers`: one layer's graph, not 32 unrolled)",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        choices=tuple(mode for mode in COMPILE_MODE_SUFFIX if mode),
        help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs on a GPU)",
    )


def add_adamw_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adamw",
        choices=("default", "foreach", "fused"),
        default="default",
        help="AdamW implementation: torch's default for the device (foreach on CUDA, a per-tensor loop on the "
        "CPU), or forced; `foreach` on the CPU dispatches what the CUDA default does; `fused` is what the HF "
        "Trainer steps by default (`adamw_torch_fused`, torch >= 2.8)",
    )


def adamw_kwargs(choice: str) -> dict[str, Any]:
    """`torch.optim.AdamW` keyword arguments of `--adamw`."""
    return {} if choice == "default" else {choice: True}


def check_compile_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.compile_mode and not args.compile:
        parser.error(f"--compile-mode {args.compile_mode} needs --compile (model or layers).")


def compile_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """`torch.compile` keyword arguments of `--compile-mode`."""
    return {"mode": args.compile_mode} if args.compile_mode else None


# ---------------------------------------------------------------- inputs and variants


@dataclass
class Inputs:
    """Random token ids and images, the same for every variant."""

    ids: torch.Tensor  # (B, S) training tokens
    prompt: torch.Tensor  # (B, P) generation prompts
    pixel_values: torch.Tensor  # (B, 3, H, W)
    generation: GenerationConfig


def make_inputs(preset: Preset, config, device: torch.device, dtype: torch.dtype, seq_len: int | None = None):
    generator = torch.Generator().manual_seed(0)
    low = 3  # skip pad/bos/eos ids
    ids = torch.randint(low, config.vocab_size, (preset.batch, seq_len or preset.seq_len), generator=generator)
    prompt = torch.randint(low, config.vocab_size, (preset.batch, preset.gen_prompt), generator=generator)
    ids[:, 0] = prompt[:, 0] = config.bos_token_id
    size = preset.image_size
    pixels = torch.rand(preset.batch, 3, size, size, generator=generator)
    generation = GenerationConfig(
        max_new_tokens=preset.gen_new,
        min_new_tokens=preset.gen_new,  # exactly gen_new tokens for every variant
        do_sample=False,
        use_cache=True,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else config.eos_token_id,
        eos_token_id=config.eos_token_id,
    )
    return Inputs(ids.to(device), prompt.to(device), pixels.to(device=device, dtype=dtype), generation)


@dataclass
class Variant:
    """One model and what is measured on it: a train step and/or a generate call, as closures."""

    key: str  # a key of `models.MODELS`
    model: nn.Module
    names: dict[str, str | None]  # "train"/"generate" → the variant name reported, None where not measured
    calls: dict[str, Callable[[], Any]] = field(default_factory=dict)
    wall: dict[str, list[float]] = field(default_factory=lambda: {"train": [], "generate": []})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {"train": [], "generate": []})
    # the reference's time around each measurement (mean of the one before and after), for the paired ratios
    ref_wall: dict[str, list[float]] = field(default_factory=lambda: {"train": [], "generate": []})
    ref_cpu: dict[str, list[float]] = field(default_factory=lambda: {"train": [], "generate": []})


def _floor_forward(model: nn.Module, inputs: Inputs, prefix: FrozenVisualPrefix | None, run: nn.Module | None = None):
    """The floor's loss; `run` calls the model (`model` itself, or its compiled wrapper)."""
    embed, run = model.get_input_embeddings(), model if run is None else run
    labels = inputs.ids
    if prefix is not None:
        labels = torch.cat([labels.new_full((labels.shape[0], prefix.tokens), -100), labels], dim=1)

    def forward() -> torch.Tensor:
        embeds = embed(inputs.ids)
        if prefix is not None:
            embeds = prefix(inputs.pixel_values, embeds)
        embeds.requires_grad_(True)  # a leaf: gradients flow through every layer to it and stop there
        return run(inputs_embeds=embeds, labels=labels, use_cache=False).loss

    return forward


def _peft_forward(name: str, model: nn.Module, inputs: Inputs, run: nn.Module | None = None):
    """The adapted model's loss; `run` calls the model (`model` itself, or its compiled wrapper)."""
    batch = (
        image_inputs(model, inputs.ids, inputs.pixel_values) if name in IMAGE_VARIANTS else {"input_ids": inputs.ids}
    )
    run = model if run is None else run
    return lambda: run(**batch, labels=batch["input_ids"], use_cache=False).loss


def train_step(
    model: nn.Module, forward: Callable[[], torch.Tensor], adamw: dict[str, Any] | None = None
) -> Callable[[], torch.Tensor]:
    """forward + backward + AdamW step + zero_grad; a model without trainable parameters steps one dummy scalar.

    `adamw`: extra `torch.optim.AdamW` kwargs (`foreach=True`, `fused=True`); torch's default when None."""
    device = model.get_input_embeddings().weight.device
    params = trainable_parameters(model) or [nn.Parameter(torch.zeros(1, device=device))]
    optimizer = torch.optim.AdamW(params, lr=1e-4, **(adamw or {}))

    def step() -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration for CUDA graphs (mode="reduce-overhead")
        model.train()
        loss = forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def generate_call(
    name: str,
    model: nn.Module,
    inputs: Inputs,
    prefix: FrozenVisualPrefix | None,
    compile_mode: str | None = None,
    compile_kwargs: dict[str, Any] | None = None,
):
    """Cached greedy `generate` of exactly `gen_new` tokens (in eval mode, without grad).

    `compile_mode` "model": compiled decoding, with a static cache and the forward that `generate` calls (the
    `LlamaForCausalLM`'s: prefill and every step) through `torch.compile` during the call; "layers": a static cache,
    the decoder layers compiled by `compile_layers` beforehand."""
    image = name in IMAGE_VARIANTS and prefix is None
    batch = image_inputs(model, inputs.prompt, inputs.pixel_values) if image else {"input_ids": inputs.prompt}
    mask = torch.ones_like(batch["input_ids"])
    generation = inputs.generation
    causal_lm = compiled_forward = None
    if compile_mode:
        generation = copy.deepcopy(generation)
        generation.cache_implementation = "static"
    if compile_mode == "model":
        raise_recompile_limit()
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        compiled_forward = torch.compile(causal_lm.forward, **(compile_kwargs or {}))

    def call() -> torch.Tensor:
        if prefix is None:
            return model.generate(**batch, attention_mask=mask, generation_config=generation)
        embeds = prefix(inputs.pixel_values, model.get_input_embeddings()(inputs.prompt))  # base_image
        full_mask = mask.new_ones(embeds.shape[:2])
        return model.generate(inputs_embeds=embeds, attention_mask=full_mask, generation_config=generation)

    @torch.no_grad()
    def generate() -> torch.Tensor:
        model.eval()
        if compiled_forward is None:
            return call()
        causal_lm.forward = compiled_forward  # the instance's forward for this call, the class's again after it
        try:
            return call()
        finally:
            del causal_lm.forward

    return generate


def build_variants(
    keys: Sequence[str],
    base: nn.Module,
    preset: Preset,
    inputs: Inputs,
    kinds: Sequence[str] = ("train", "generate"),
    adamw: dict[str, Any] | None = None,
    compile_mode: str | None = None,
    compile_kwargs: dict[str, Any] | None = None,
) -> dict[str, Variant]:
    """One `Variant` per model key, each on a weight-sharing copy of `base`, with calls for `kinds` only (train
    steps with AdamW's `adamw` kwargs). `compile_mode` "model": the model calls and the image reference's visual
    prefix through `torch.compile`; "layers": each decoder layer (`compile_layers`), every encoder eager; either
    with `torch.compile`'s `compile_kwargs`."""
    compile_kwargs = compile_kwargs or {}
    device = base.get_input_embeddings().weight.device
    prefix = FrozenVisualPrefix(preset, base.config.hidden_size, device, base.dtype) if "plain_image" in keys else None
    if compile_mode == "model":
        raise_recompile_limit()  # the variants' calls share code objects
        if prefix is not None:  # "layers": eager, as LaVIN's own encoder then is
            prefix = torch.compile(prefix, **compile_kwargs)
    variants = {}
    for key in keys:
        model = build_model(key, base, preset)
        train_name, gen_name = MODELS[key]
        variant = Variant(key, model, {"train": train_name, "generate": gen_name})
        own_prefix = prefix if key == "plain_image" else None
        if compile_mode == "layers":
            compile_layers(model, **compile_kwargs)
        if train_name and "train" in kinds:
            run = torch.compile(model, **compile_kwargs) if compile_mode == "model" else model
            forward = (
                _floor_forward(model, inputs, own_prefix, run)
                if key.startswith("plain")
                else _peft_forward(train_name, model, inputs, run)
            )
            variant.calls["train"] = train_step(model, forward, adamw)
        if gen_name and "generate" in kinds:
            variant.calls["generate"] = generate_call(
                gen_name, model, inputs, own_prefix, compile_mode, compile_kwargs
            )
        variants[key] = variant
    return variants


# ---------------------------------------------------------------- measurement


def reference_key(variant: Variant, kind: str) -> str:
    """The model whose `kind` call is `variant`'s reference: the plain base, with the encoder for image variants."""
    return "plain_image" if variant.names[kind] in IMAGE_VARIANTS else "plain"


def run_rounds(
    variants: dict[str, Variant], rounds: int, device: torch.device, seed: int = 0, calls_per_visit: int = 1
) -> None:
    """One untimed warm-up call of everything, then `rounds` rounds of A-B-A measurements.

    Each round visits every (model, kind) once, grouped by reference and shuffled, and measures the reference
    between every two of them: R X₁ R X₂ R … X's time is paired with the mean of the R just before and after it,
    which cancels load that drifts slower than a step. A visit makes `calls_per_visit` calls and times the last:
    under CUDA graphs (`--compile-mode reduce-overhead`) a model called after another may record its graphs again
    (measured: 2–4 s instead of 0.05–0.14 s, in some visits of every model), which the first calls absorb.
    """
    jobs = [(key, kind) for key, variant in variants.items() for kind in variant.calls]
    for key, kind in jobs:
        variants[key].calls[kind]()
    rng = random.Random(seed)

    def measure(key: str, kind: str) -> tuple[float, float]:
        for _ in range(calls_per_visit - 1):
            variants[key].calls[kind]()
        wall, cpu, _ = timed(variants[key].calls[kind], device)
        variants[key].wall[kind].append(wall)
        variants[key].cpu[kind].append(cpu)
        return wall, cpu

    for r in range(rounds):
        groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for key, kind in jobs:
            ref = (reference_key(variants[key], kind), kind)
            if (key, kind) != ref and ref[0] in variants:
                groups.setdefault(ref, []).append((key, kind))
        order = list(groups)
        rng.shuffle(order)
        for ref in order:
            rng.shuffle(groups[ref])
            before = measure(*ref)
            for key, kind in groups[ref]:
                measure(key, kind)
                after = measure(*ref)
                variants[key].ref_wall[kind].append((before[0] + after[0]) / 2)
                variants[key].ref_cpu[kind].append((before[1] + after[1]) / 2)
                before = after
        print(f"round {r + 1}/{rounds} done, load {load_average()}", file=sys.stderr, flush=True)


def measure_memories(variants: dict[str, Variant], train: dict[str, dict[str, Any]], device: torch.device) -> None:
    """`measure_memory` of every variant with a train step, into its row of the summary's `train` table."""
    for variant in variants.values():
        if "train" in variant.calls:
            train[variant.names["train"]].update(measure_memory(variant, device))


def measure_memory(variant: Variant, device: torch.device) -> dict[str, int | None]:
    """Peak live tensor bytes over one steady-state train step, and the bytes autograd saved for backward."""
    step = variant.calls["train"]
    saved = SavedActivations(variant.model)
    with saved():
        step()
    return {**peak_memory(step, device), "saved_activation_bytes": saved.bytes}


def paired_ratios(values: list[float], reference: list[float], speed: bool = False) -> list[float]:
    """time / reference time of each measurement (a cost: 1.05 is 5 % slower), or with `speed` the inverse (a
    throughput: 0.95 is 5 % fewer tokens/s)."""
    return [(r / v if speed else v / r) for v, r in zip(values, reference) if r > 0 and v > 0]


def summarize(variants: dict[str, Variant], preset: Preset) -> dict[str, dict[str, dict[str, Any]]]:
    """Per kind and variant name: raw times, medians, and the median of the A-B-A paired ratios."""
    out: dict[str, dict[str, dict[str, Any]]] = {"train": {}, "generate": {}}
    for variant in variants.values():
        for kind in variant.calls:
            name, speed = variant.names[kind], kind == "generate"
            reference = (IMAGE_REFERENCE if name in IMAGE_VARIANTS else REFERENCE)[kind]
            is_reference = variant.key == reference_key(variant, kind)
            ratios_wall = paired_ratios(variant.wall[kind], variant.ref_wall[kind], speed)
            ratios_cpu = paired_ratios(variant.cpu[kind], variant.ref_cpu[kind], speed)
            row: dict[str, Any] = {
                "reference": reference,
                "wall_s": variant.wall[kind],
                "cpu_s": variant.cpu[kind],
                "median_wall_s": median(variant.wall[kind]),
                "median_cpu_s": median(variant.cpu[kind]),
                "ratio_wall": 1.0 if is_reference else median(ratios_wall),
                "ratio_cpu": 1.0 if is_reference else median(ratios_cpu),
                "ratios_wall": ratios_wall,
                "ratios_cpu": ratios_cpu,
            }
            if kind == "train":
                row["trainable_params"] = 0 if variant.key.startswith("plain") else count_parameters(variant.model)
            else:
                row["tokens_per_s"] = preset.batch * preset.gen_new / row["median_wall_s"]
                row["tokens_per_cpu_s"] = preset.batch * preset.gen_new / row["median_cpu_s"]
            out[kind][name] = row
    for kind, names in (("train", TRAIN_VARIANTS), ("generate", GEN_VARIANTS)):
        out[kind] = {name: out[kind][name] for name in names if name in out[kind]}  # a fixed order
    return out


# ---------------------------------------------------------------- main


def default_out(
    preset: str, device: torch.device, compiled: bool = False, mode: str | None = None, kinds: Sequence[str] = ()
) -> str:
    suffix = "_compiled" + COMPILE_MODE_SUFFIX[mode] if compiled else ""
    suffix += "_generate" if list(kinds) == ["generate"] else ""
    return str(RESULTS_DIR / f"speed_{preset}_{device.type}{suffix}.json")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" or preset.name == "7b" else "fp32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    if preset.name == "7b" and device.type not in ("cuda", "meta"):
        raise SystemExit(
            "--preset 7b builds a 7B-shaped model on the device and needs --device cuda (or --device meta for a dry "
            "validation that allocates nothing); refusing to build it on the CPU."
        )
    command = "python -m benchmarks.speed " + " ".join(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {
        "benchmark": "speed",
        "command": command.strip(),
        "preset": preset.name,
        "dtype": str(dtype).removeprefix("torch."),
        "rounds": args.rounds,
        "compiled": bool(args.compile),
        "compile_mode": args.compile,
        "compile_kwargs": compile_options(args) or {},
        "adamw": args.adamw,
        "machine": machine_info(device),
        "settings": vars(preset) | {"threads": torch.get_num_threads()},
        # a shared CPU's other processes inflate wall time; one thread's CPU time is what the variant itself costs
        "decisive_metric": "ratio_cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "ratio_wall",
    }
    if device.type == "meta":
        from .dry_run import dry_validate

        result["dry_run"] = dry_validate(preset, dtype)
        write_json(result, args.out or default_out(preset.name, device))
        return result
    started = time.time()
    torch.manual_seed(0)
    base = build_base(preset, device, dtype)
    inputs = make_inputs(preset, base.config, device, dtype)
    kinds = ["train"] if args.memory_only else args.kinds
    variants = build_variants(
        args.variants or list(MODELS),
        base,
        preset,
        inputs,
        kinds,
        adamw_kwargs(args.adamw),
        compile_mode=args.compile,
        compile_kwargs=compile_options(args),
    )
    if args.memory_only:
        out = args.out or str(RESULTS_DIR / f"memory_{preset.name}_{device.type}.json")
        return memory_only(result, variants, device, out)
    graphs = args.compile_mode == "reduce-overhead" and device.type == "cuda"
    if graphs:  # every visit may record its graphs anew (below); don't fall back to no graphs after 128 of them
        from torch._inductor import config as inductor_config

        inductor_config.triton.cudagraph_unexpected_rerecord_limit = 1_000_000
    run_rounds(variants, args.rounds, device, calls_per_visit=3 if graphs else 1)
    result |= summarize(variants, preset)
    if args.compile:
        result["compile_stats"] = compile_stats()
    if not (args.no_memory or args.compile):
        measure_memories(variants, result["train"], device)
    result["targets"] = check_targets(result)
    if args.projection or (args.projection is None and preset.name == "7b"):
        from .projection import measure_projection

        # Free every variant first: their weight-sharing copies would keep the dense weights alive after the
        # projection quantizes `base` to 4-bit (measured: 19.8 GB instead of 6.8 GB at 7B when one was left).
        variants.clear()
        gc.collect()
        result["projection"] = measure_projection(base, preset, device, dtype)
    result["load_after"] = load_average()
    result["elapsed_s"] = round(time.time() - started, 1)
    path = write_json(
        result, args.out or default_out(preset.name, device, bool(args.compile), args.compile_mode, kinds)
    )
    print_summary(result)
    print(f"wrote {path}")
    return result


def memory_only(result: dict[str, Any], variants: dict[str, Variant], device: torch.device, out: str) -> dict:
    """Peak training memory of every variant (after a warm-up step, which creates the optimizer state), and each
    one's peak over its floor's, without timing anything."""
    for variant in variants.values():
        variant.calls["train"]()
    rows = result["train"] = {variant.names["train"]: {} for variant in variants.values()}
    measure_memories(variants, rows, device)
    for variant in variants.values():
        name, floor = variant.names["train"], variants.get(reference_key(variant, "train"))
        row, reference = rows[name], floor and rows[floor.names["train"]]
        if reference and row["peak_bytes"] is not None and reference["peak_bytes"] is not None:
            row["peak_over_floor_mib"] = round((row["peak_bytes"] - reference["peak_bytes"]) / 2**20, 1)
        peak = row["peak_bytes"] and row["peak_bytes"] / 2**20
        print(f"  {name:20s} peak {peak} MiB, over its floor {row.get('peak_over_floor_mib')} MiB")
    result["load_after"] = load_average()
    print(f"wrote {write_json(result, out)}")
    return result


def print_summary(result: dict[str, Any]) -> None:
    for kind in ("train", "generate"):
        print(
            f"\n{kind}: variant, median wall s, ratio (wall), ratio (cpu)"
            + (", tokens/s" if kind == "generate" else "")
        )
        for name, row in result[kind].items():
            extra = f"  {row['tokens_per_s']:8.1f}" if kind == "generate" else ""
            ratio_wall, ratio_cpu = row["ratio_wall"] or float("nan"), row["ratio_cpu"] or float("nan")
            print(f"  {name:20s} {row['median_wall_s']:8.3f}  {ratio_wall:6.3f}  {ratio_cpu:6.3f}{extra}")
    for target in result.get("targets", []):
        print(f"{'MET ' if target['met'] else 'MISS'} {target['name']}: {target['value']} (goal {target['goal']})")


if __name__ == "__main__":
    main()
