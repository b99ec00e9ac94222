"""What every benchmark shares: machine information, timing and memory probes, weight sharing, JSON results.

Timings on a shared machine are noisy, so every measurement records both wall time (`time.perf_counter`) and the
process CPU time (`time.process_time`), and the scripts interleave their variants round-robin and report medians
and ratios measured in the same rounds.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peft_mma.utils import decoder_layers

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's marketing name (`/proc/cpuinfo` on Linux, `platform.processor()` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (what `uptime` prints), or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> str | None:
    """The commit of the checkout the benchmark runs from, with `+dirty` when it has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = ["git", "status", "--porcelain", "--", "peft_mma", "benchmarks", ":!benchmarks/results"]
        dirty = subprocess.run(status, cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Everything needed to read a result: CPU, cores, threads, load, accelerator, library versions, commit."""
    import peft
    import transformers

    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "git_commit": git_commit(),
        "device": device.type,
        "device_name": cpu_model() if device.type in ("cpu", "meta") else None,
    }
    try:
        import psutil

        info["memory_total_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------- results


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write `data` as indented JSON (creating the folder); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call of `fn`, synchronising an accelerator around it."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, result


# ---------------------------------------------------------------- memory


class SavedActivations:
    """Counts the bytes autograd saves for backward that are not parameters, each storage once.

    A public-API, device-independent view of activation memory: what a method adds on top of the frozen base is
    mostly what it makes autograd keep between forward and backward.
    """

    def __init__(self, model: nn.Module) -> None:
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: set[int] = set()
        self.bytes = 0
        self.by_shape: dict[str, int] = {}  # bytes by the shape each storage was first saved as ("4x256x576")

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._params and ptr not in self._seen and tensor.device.type != "meta":
            self._seen.add(ptr)
            self.bytes += storage.nbytes()
            shape = "x".join(map(str, tensor.shape))
            self.by_shape[shape] = self.by_shape.get(shape, 0) + storage.nbytes()
        return tensor

    @contextmanager
    def __call__(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, int | None]:
    """Peak bytes of live tensors while `fn` runs, including what was alive before (weights, optimizer state).

    CUDA: `torch.cuda.max_memory_allocated`. CPU: the allocation timeline of `torch.profiler` (record_shapes,
    with_stack, profile_memory), summed over categories; None where the profiler cannot build it.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "before_bytes": before}
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof:
            fn()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
        totals = [sum(row) for row in sizes]
        return {"peak_bytes": int(max(totals)), "before_bytes": int(totals[0])}
    except Exception as error:  # private API: report instead of failing the benchmark
        print(f"CPU memory timeline unavailable ({type(error).__name__}: {error}); peak memory not reported")
        fn()
        return {"peak_bytes": None, "before_bytes": None}


# ---------------------------------------------------------------- models


def share_weights_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters are new `Parameter` objects over the same storage.

    Variants measured side by side in one process then cost no extra weight memory. Adapters and merges assign
    `weight.data = …` on their own parameter objects, which leaves the other copies untouched; an in-place write
    into a weight (`weight.data.add_`) would not, so merged variants are built with `copy.deepcopy` instead.
    """
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def compile_layers(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Regional compilation, PyTorch's recipe against an LLM's cold start: every decoder layer's call goes through
    `torch.compile` in place (`nn.Module.compile`), and layers of one structure share the compiled graph, so a
    32-layer 7B compiles one layer instead of unrolling 32. The model keeps its class, hooks and adapters;
    embeddings, the final norm, the head and whatever runs around the layers stay eager.

    Every layer of every model compiled in one process shares dynamo's cache of `Module._call_impl`
    (`raise_recompile_limit`).
    """
    raise_recompile_limit()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in decoder_layers(inner):
        layer.compile(**compile_kwargs)
    return model


def raise_recompile_limit(limit: int = 64) -> None:
    """Models compiled side by side in one process share dynamo's cache of each code object they run (a module's
    `_call_impl`, `LlamaForCausalLM.forward`), one entry per model and input shape: the limit is raised so that
    they never fall back to eager, and hitting it raises instead of timing eager code as compiled."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True


def compile_stats() -> dict[str, int]:
    """What dynamo compiled in this process: distinct graphs, and graph breaks (0 where everything traced)."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))
