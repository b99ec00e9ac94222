"""Each adapter's autograd node against the frozen op it adapts, forward + backward at one layer's shapes: where a
train step's device time goes, node by node (issue 14, items 6–7).

    python -m benchmarks.nodes --preset 7b --device cuda     # → results/nodes_7b_cuda.json
    python -m benchmarks.nodes --preset tiny                  # the same on the CPU, in seconds

Every case runs its adapted node and its frozen counterpart (None where the frozen model has nothing there) on the
preset's activations, B × T tokens of width C, with gradients flowing to the input as in a train step, eagerly and
under `torch.compile` (the node's function compiled alone, inductor's default mode). Per case: the time of a call
after warm-up (on a GPU its kernels' device time, which is what a step under CUDA graphs pays; on a CPU the median
process time of `--reps` calls), the time added per call, and that times the number of such nodes in a 7B-shaped
train step, so the cases add up to what a method's layers add to the floor's kernels.

LaVIN's adapter is also run as it ran before 2026-12-04 (`lavin_adapter_before`): on float32 activations (the
bfloat16 input cast up and the output cast back) with P's h + 1 = 9 rows, to measure what computing in the
activations' dtype and aligned rows (`lavin.function.path_rows`) save.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from peft_mma.attention import gated_prompt_key_value, prompt_attention
from peft_mma.lavin import function as lavin_function
from peft_mma.llama_adapter_v2.function import ScaledLinear, TunedRMSNorm

from .common import RESULTS_DIR, machine_info, median, write_json
from .models import PRESETS
from .profile import kernel_events
from .speed import DTYPES


@dataclass
class Case:
    name: str
    method: str
    per_step: int  # such nodes in one train step of the preset's model
    inputs: list[torch.Tensor]  # differentiable inputs, activations first
    adapted: Callable[..., torch.Tensor]
    frozen: Callable[..., torch.Tensor] | None
    row_multiple: int | None = None  # `lavin.function.ROW_MULTIPLE` while the case runs


def cases(preset_name: str, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """The cases at `preset`'s shapes: V2's linear per width (attention, gate/up, down), tuned norm and gated
    prompt, LaVIN's adapter now and as before."""
    preset = PRESETS[preset_name]
    config = preset.llama
    width, inner, heads, layers = (config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                      "num_hidden_layers"))  # fmt: skip
    tokens, head_dim, prompt = (preset.batch, preset.seq_len), width // heads, 10
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True, act=True, std=1.0, mean=0.0):
        t = (torch.randn(*shape, generator=generator) * std + mean).to(device, dtype if act else torch.float32)
        return t.requires_grad_(grad)

    def linear_case(name: str, fan_in: int, fan_out: int, per_step: int) -> Case:
        x, weight = rand(*tokens, fan_in), rand(fan_out, fan_in, grad=False, std=fan_in**-0.5)
        bias, scale = rand(fan_out, act=False, std=0.0), rand(fan_out, act=False, std=0.0, mean=1.0)
        return Case(name, "v2", per_step, [x, bias, scale], lambda x, b, s: ScaledLinear.apply(x, weight, b, s, True),
                    lambda x, b, s: torch.nn.functional.linear(x, weight))  # fmt: skip

    frozen_norm = LlamaRMSNorm(width, eps=1e-6).to(device, dtype).requires_grad_(False)  # the frozen model's norm
    key, value, gate = rand(1, heads, prompt, head_dim), rand(1, heads, prompt, head_dim), rand(heads, act=False)

    def gated_prompt(q, o, k, v, g):
        gated_key, gated_value = gated_prompt_key_value(k, v, g, heads, q.dtype)
        return o + prompt_attention(q, gated_key.expand(len(q), -1, -1, -1), gated_value.expand(len(q), -1, -1, -1),
                                    head_dim**-0.5)  # fmt: skip

    hidden, groups = 8, 2
    adapter = [rand(hidden, width, act=False, std=width**-0.5), rand(hidden, act=False),  # A, a
               rand(groups, width // groups, hidden // groups, act=False), rand(width, act=False),  # B, b
               rand(groups, width // groups, hidden // groups, act=False), rand(width, act=False),  # D, d
               rand(2, width, act=False, std=width**-0.5), rand(2, act=False)]  # W_m, b_m  # fmt: skip

    def routed(x, *params):
        return lavin_function.RoutedAdapter.apply(x, *params, 10.0, 1.0, 0.1, False, None)[0]

    def routed_before(x, *params):  # timed with ROW_MULTIPLE = 1 (`Case.row_multiple`)
        return routed(x.float(), *params).to(x.dtype)

    x = rand(*tokens, width)
    return [
        linear_case("v2_linear_attention", width, width, 4 * layers),
        linear_case("v2_linear_gate_up", width, inner, 2 * layers),
        linear_case("v2_linear_down", inner, width, layers),
        Case(
            "v2_norm",
            "v2",
            2 * layers + 1,
            [x, rand(width, act=False, std=0.0, mean=1.0)],
            lambda x, w: TunedRMSNorm.apply(x, w, 1e-6),
            lambda x, w: frozen_norm(x),
        ),  # fmt: skip
        Case(
            "v2_prompt",
            "v2",
            layers - 1,
            [rand(tokens[0], heads, tokens[1], head_dim), rand(*tokens, heads, head_dim), key, value, gate],
            gated_prompt,
            None,
        ),  # fmt: skip
        Case("lavin_adapter", "lavin", layers, [x, *adapter], routed, None),
        Case("lavin_adapter_before", "lavin_before", layers, [x, *adapter], routed_before, None, row_multiple=1),
    ]


def time_call(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], device: torch.device, reps: int) -> float:
    """Seconds of one forward + backward (a fixed output gradient) of `fn(*inputs)`, after 3 warm-up calls: on a
    GPU the summed device time of its kernels (`profile.kernel_events`) over `reps` calls, divided by `reps`,
    which is what the node costs once CUDA graphs remove the launches (a single call's wall time on a GPU is
    mostly the host launching it); on a CPU the median process time over `reps` calls."""
    grad = torch.randn_like(fn(*inputs))

    def call():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)

    for _ in range(3):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                call()
            torch.cuda.synchronize(device)
        return sum(e.device_time for e in kernel_events(prof.events())) / 1e6 / reps
    times = []
    for _ in range(reps):
        begin = time.process_time()
        call()
        times.append(time.process_time() - begin)
    return median(times)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--out", default=None, help="default: results/nodes_<preset>_<device>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    modes = {"eager": lambda fn: fn} | ({} if args.no_compile else {"compiled": torch.compile})
    rows = {}
    for case in cases(args.preset, device, dtype):
        row = {"method": case.method, "per_step": case.per_step}
        multiple = lavin_function.ROW_MULTIPLE
        lavin_function.ROW_MULTIPLE = case.row_multiple or multiple
        try:
            for mode, wrap in modes.items():
                adapted = time_call(wrap(case.adapted), case.inputs, device, args.reps)
                frozen = time_call(wrap(case.frozen), case.inputs, device, args.reps) if case.frozen else 0.0
                added = (adapted - frozen) * case.per_step
                row[mode] = {"adapted_s": adapted, "frozen_s": frozen, "added_per_step_s": added}
        finally:
            lavin_function.ROW_MULTIPLE = multiple
        rows[case.name] = row
        print(case.name, {mode: f"{row[mode]['added_per_step_s'] * 1e3:.2f} ms/step" for mode in modes})
    totals = {
        method: {
            mode: sum(r[mode]["added_per_step_s"] for r in rows.values() if r["method"] == method) for mode in modes
        }
        for method in sorted({r["method"] for r in rows.values()})
    }
    print("added per train step:", {m: {k: f"{v * 1e3:.1f} ms" for k, v in t.items()} for m, t in totals.items()})
    out = {"command": "python -m benchmarks.nodes " + " ".join(argv or sys.argv[1:]), "preset": args.preset}
    out |= {"dtype": str(dtype).removeprefix("torch."), "machine": machine_info(device), "cases": rows}
    out["added_per_step_s"] = totals
    print(f"wrote {write_json(out, args.out or RESULTS_DIR / f'nodes_{args.preset}_{device.type}.json')}")


if __name__ == "__main__":
    main()
