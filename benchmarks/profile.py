"""torch.profiler tables of one variant's train step or generate call, next to its reference, for finding costs.

    python -m benchmarks.profile --models plain v2 --kind train        # → results/profile_train_<model>.txt

Each table is sorted by self CPU time (`--sort`) and written with the machine and load it was taken under.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from .common import RESULTS_DIR, load_average, machine_info
from .models import MODELS, PRESETS, build_base
from .speed import DTYPES, build_variants, make_inputs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["plain", "v2"])
    parser.add_argument("--kind", choices=("train", "generate"), default="train")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sort", default="self_cpu_time_total")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--tag", default="", help="suffix of the output file names (e.g. before/after a fix)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    preset = PRESETS[args.preset]
    base = build_base(preset, device, dtype)
    inputs = make_inputs(preset, base.config, device, dtype)
    variants = build_variants(args.models, base, preset, inputs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for key, variant in variants.items():
        call = variant.calls.get(args.kind)
        if call is None:
            continue
        call()  # warm-up (optimizer state, caches)
        with profile(activities=activities, record_shapes=False) as prof:
            call()
        table = prof.key_averages().table(sort_by=args.sort, row_limit=args.rows, max_name_column_width=60)
        path = RESULTS_DIR / f"profile_{args.kind}_{key}{'_' + args.tag if args.tag else ''}.txt"
        header = f"# {args.kind} {key} preset={preset.name} {machine_info(device)} load_after={load_average()}\n"
        path.write_text(header + table + "\n")
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
        print(f"{key}: self CPU total {total:.2f} s -> {path}")


if __name__ == "__main__":
    main()
