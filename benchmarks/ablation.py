"""Where V2's merged generation time goes: the merged model against copies with parts of the adapter removed.

    python -m benchmarks.ablation --rounds 4        # → results/ablation_v2_merged_generate.json

Variants (all V2 default, merged with `merge_adapter()`; numbers are tokens/s relative to the plain base, A-B-A
paired on process CPU time as in `benchmarks.speed`):
  * ``merged``: as PEFT leaves it: every linear and norm still behind its tuner wrapper;
  * ``unwrapped``: the fully merged wrappers replaced by their base layers (o_proj keeps the prompts; the k/v of
    prompted layers, which the prompts read unadapted and which therefore stay unmerged, keep their wrappers);
  * ``unwrapped_kv``: the k/v wrappers removed too (timing only: the prompts then read adapted k/v);
  * ``no_prompt``: every wrapper removed, so no prompt term (the attention function wrapper stays installed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .common import RESULTS_DIR, load_average, machine_info, share_weights_copy, write_json
from .models import PRESETS, build_base, build_model
from .speed import generate_call, make_inputs


def unwrap(model: nn.Module, keep) -> nn.Module:
    """Replace every tuner wrapper for which `keep(wrapper)` is false by its base layer, in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, BaseTunerLayer) and not keep(child):
                setattr(module, name, child.get_base_layer())
    return model


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    preset, device = PRESETS["smollm2"], torch.device("cpu")
    base = build_base(preset, device, torch.float32)
    inputs = make_inputs(preset, base.config, device, torch.float32)
    prompted = lambda m: hasattr(m, "mma_adapter_v2_prompt")  # noqa: E731
    models = {
        "merged": build_model("v2_merged", base, preset),
        "unwrapped": unwrap(build_model("v2_merged", base, preset), lambda m: prompted(m) or not m.merged),
        "unwrapped_kv": unwrap(build_model("v2_merged", base, preset), prompted),
        "no_prompt": unwrap(build_model("v2_merged", base, preset), lambda m: False),
    }
    calls = {name: generate_call("v2_merged", model, inputs, None) for name, model in models.items()}
    plain = generate_call("base", share_weights_copy(base), inputs, None)
    for call in (plain, *calls.values()):
        call()
    ratios: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        before = _cpu(plain)
        for name, call in calls.items():
            value, after = _cpu(call), _cpu(plain)
            ratios[name].append((before + after) / 2 / value)
            before = after
    result = {
        "benchmark": "ablation_v2_merged_generate",
        "command": "python -m benchmarks.ablation " + " ".join(argv or []),
        "machine": machine_info(device),
        "load_after": load_average(),
        "ratio_cpu": {name: statistics.median(values) for name, values in ratios.items()},
        "ratios_cpu": ratios,
    }
    write_json(result, RESULTS_DIR / "ablation_v2_merged_generate.json")
    print(result["ratio_cpu"])
    return result


def _cpu(call) -> float:
    start = time.process_time()
    call()
    return time.process_time() - start


if __name__ == "__main__":
    main()
