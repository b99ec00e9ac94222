"""torch.profiler tables of one variant's train step or generate call, next to its reference, for finding costs.

    python -m benchmarks.profile --models plain v2 --kind train        # → results/profile_train_<model>.txt
    python -m benchmarks.profile --preset 7b --device cuda --models plain v2 lavin_text --tag 7b_cuda
    python -m benchmarks.profile --preset 7b --device cuda --compile layers --tag 7b_cuda_compiled   # inductor kernels
    python -m benchmarks.profile --compile --models plain v2 --tag smollm2_cpu_compiled   # inductor's C++ kernels
    python -m benchmarks.profile --saved-tensors --models plain v2 lora_qv   # what autograd keeps, by shape

Each table is sorted by self CPU time (`--sort`) and written with the machine and load it was taken under. A summary
per model goes to results/profile_<kind>[_<tag>].json: the median wall time of 5 calls, and from one profiled call
the number of aten ops dispatched (top-level ones, and all calls, nested ones too) and, on CUDA, of kernels and their
summed device time. Where the kernel time is far below the wall time, the step is bound by dispatching and launching
ops, and its cost is their number. On the CPU the summary also splits the profiled call's self CPU time into
matrix products, attention kernels, inductor's fused C++ kernels (compiled on the CPU, each kernel is then a
profiler event of its own: inductor's `cpp.enable_kernel_profile` option) and the rest: where a compiled adapter's
time goes beside the floor's. `--saved-tensors` adds what autograd keeps for backward in one step (each storage
counted once, parameters not), in MiB by the shape it was first kept as: what a method's training memory over the
floor is made of.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .common import RESULTS_DIR, SavedActivations, load_average, machine_info, median, timed, write_json
from .models import MODELS, PRESETS, build_base
from .speed import (
    DTYPES,
    adamw_kwargs,
    add_adamw_argument,
    add_compile_arguments,
    build_variants,
    check_compile_arguments,
    compile_options,
    make_inputs,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["plain", "v2"])
    parser.add_argument("--kind", choices=("train", "generate"), default="train")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sort", default="self_cpu_time_total", help="table order (self_device_time_total: kernels)")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--tag", default="", help="suffix of the output file names (e.g. before/after a fix)")
    add_adamw_argument(parser)
    add_compile_arguments(parser, "the profiled train step")
    parser.add_argument("--no-tables", action="store_true", help="write only the summary JSON")
    parser.add_argument(
        "--saved-tensors", action="store_true", help="also total what autograd keeps for backward, by shape"
    )
    parser.add_argument(
        "--out", default=None, help="summary JSON, the tables beside it (default: results/profile_<kind>[_<tag>].json)"
    )
    args = parser.parse_args(argv)
    check_compile_arguments(parser, args)
    if args.compile and args.kind != "train":
        parser.error("--compile profiles train steps only (`--kind train`).")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    preset = PRESETS[args.preset]
    base = build_base(preset, device, dtype)
    inputs = make_inputs(preset, base.config, device, dtype)
    adamw = adamw_kwargs(args.adamw)
    compile_kwargs = compile_options(args)
    if args.compile and device.type == "cpu" and compile_kwargs is None:
        compile_kwargs = {"options": {"cpp.enable_kernel_profile": True}}  # each C++ kernel an event of its own
    variants = build_variants(args.models, base, preset, inputs, [args.kind], adamw, args.compile, compile_kwargs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    suffix = "_" + args.tag if args.tag else ""
    summary: dict[str, dict[str, float | int]] = {}
    for key, variant in variants.items():
        call = variant.calls.get(args.kind)
        if call is None:
            continue
        for _ in range(3 if args.compile else 1):  # warm-up (optimizer state, caches; compiling, CUDA graphs)
            call()
        wall = median([timed(call, device)[0] for _ in range(5)])
        with profile(activities=activities, record_shapes=False) as prof:
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        summary[key] = {"wall_s": wall, **dispatch_counts(prof)}
        if device.type == "cpu":
            summary[key]["self_cpu_s"] = self_cpu_by_kind(prof)
        if args.saved_tensors:
            saved = SavedActivations(variant.model)
            with saved():
                call()
            summary[key]["saved_mib"] = saved.bytes / 2**20
            by_shape = sorted(saved.by_shape.items(), key=lambda item: -item[1])
            summary[key]["saved_mib_by_shape"] = {shape: size / 2**20 for shape, size in by_shape}
        print(f"{key}: {summary[key]}")
        if not args.no_tables:
            table = prof.key_averages().table(sort_by=args.sort, row_limit=args.rows, max_name_column_width=60)
            path = (Path(args.out).parent if args.out else RESULTS_DIR) / f"profile_{args.kind}_{key}{suffix}.txt"
            header = f"# {args.kind} {key} preset={preset.name} {machine_info(device)} load_after={load_average()}\n"
            path.write_text(header + table + "\n")
    out = {"command": "python -m benchmarks.profile " + " ".join(argv or sys.argv[1:]), "preset": preset.name}
    out |= {"dtype": str(dtype).removeprefix("torch."), "adamw": args.adamw, "machine": machine_info(device)}
    out |= {"compile": args.compile, "compile_mode": args.compile_mode}
    out["models"] = summary
    print(f"wrote {write_json(out, args.out or RESULTS_DIR / f'profile_{args.kind}{suffix}.json')}")


def dispatch_counts(prof) -> dict[str, float | int]:
    """Top-level aten ops (not those called inside another aten op), all aten calls (nested ones too: an einsum is
    one top-level op but a dozen calls), kernels and their summed device seconds."""
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    ops = sum(1 for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    kernels = kernel_events(events)
    return {
        "aten_ops": ops,
        "aten_calls": len(aten),
        "kernels": len(kernels),
        "kernel_s": sum(e.device_time for e in kernels) / 1e6,
    }


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "aten::matmul", "aten::linear")


def self_cpu_by_kind(prof) -> dict[str, float]:
    """The profiled call's self CPU seconds in five groups: `optimizer` (everything inside `Optimizer.step`),
    `matmul` (the aten matrix products, which inductor calls as they are), `attention` (the SDPA kernels, forward
    and backward), `fused` (inductor's generated C++ kernels, `cpp_fused_…`, present when compiled with kernel
    profiling) and `other` (element-wise aten ops, autograd's and the compiled graphs' bookkeeping)."""
    groups = dict.fromkeys(("optimizer", "matmul", "attention", "fused", "other"), 0.0)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        if _inside(event, "Optimizer.step"):
            group = "optimizer"
        elif event.name in MATMULS:
            group = "matmul"
        elif "scaled_dot_product" in event.name or "flash_attention" in event.name:
            group = "attention"
        elif "cpp_fused" in event.name:
            group = "fused"
        else:
            group = "other"
        groups[group] += event.self_cpu_time_total / 1e6
    return groups


def _inside(event, prefix: str) -> bool:
    """Whether `event` or one of its CPU ancestors is named `prefix…`."""
    while event is not None:
        if event.name.startswith(prefix):
            return True
        event = event.cpu_parent
    return False


def kernel_events(events) -> list:
    """The device's kernels and copies among a profile's events: not the ranges of user annotations
    (`Optimizer.step#AdamW.step`), which span every kernel launched inside them and the gaps between."""
    cuda = torch.autograd.DeviceType.CUDA
    return [e for e in events if e.device_type == cuda and not getattr(e, "is_user_annotation", False)]


if __name__ == "__main__":
    main()
