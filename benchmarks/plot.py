"""PNG plots from the result JSON files (needs matplotlib: `pip install -e ".[bench]"`).

python -m benchmarks.plot                 # every results/*.json it knows → results/*.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR
from .targets import GENERATE_MIN, TRAIN_MAX

COLOURS = {"ours": "#d95f02", "peer": "#7570b3", "reference": "#999999"}


def _colour(name: str) -> str:
    if name.startswith(("v2", "lavin")):
        return COLOURS["ours"]
    if name in ("floor", "base", "floor_image", "base_image"):
        return COLOURS["reference"]
    return COLOURS["peer"]


def _machine(result: dict[str, Any]) -> str:
    m = result["machine"]
    return f"{m['device_name']}, {m['torch_threads']} thread(s), load {m['load_average']}"


def _metric(result: dict[str, Any]) -> str:
    """The ratio the targets use: CPU time on a (shared) CPU, wall time on an accelerator."""
    return result.get("decisive_metric", "ratio_wall")


def plot_speed(result: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = _metric(result)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    panels = [
        ("train", "train step / floor (lower is better)", TRAIN_MAX),
        (
            "generate",
            "generation tokens/s / plain base (higher is better)",
            min(GENERATE_MIN.values()),
        ),  # dashed: goals
    ]
    for ax, (kind, title, goal) in zip(axes, panels):
        rows = result.get(kind, {})
        if not rows:  # e.g. `--compile` times training only
            ax.set_title(f"{title}\nnot measured in this run")
            ax.set_axis_off()
            continue
        names = list(rows)
        values = [rows[n][metric] or 0 for n in names]
        spread = [rows[n].get(metric.replace("ratio_", "ratios_")) or [v] for n, v in zip(names, values)]
        ax.bar(names, values, color=[_colour(n) for n in names])
        for i, s in enumerate(spread):
            ax.plot([i, i], [min(s), max(s)], color="black", linewidth=1)
        goals = [GENERATE_MIN.get(n, goal) if kind == "generate" else goal for n in names]
        for i, (n, g) in enumerate(zip(names, goals)):
            if n.startswith(("v2", "lavin")):
                ax.plot([i - 0.4, i + 0.4], [g, g], linestyle="--", color="black", linewidth=0.8)
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_title(f"{title}\n{metric}, median and range over rounds")
        ax.tick_params(axis="x", rotation=60)
        low = min(min(min(s) for s in spread), goal)
        ax.set_ylim(max(0.0, low - 0.1), max(max(max(s) for s in spread), goal) + 0.1)
    ax = axes[2]
    train = result.get("train", {})
    names = [n for n in train if train[n].get("peak_bytes") is not None and not n.startswith("floor")]
    over = [(train[n]["peak_bytes"] - train[train[n]["reference"]]["peak_bytes"]) / 2**20 for n in names]
    ax.bar(names, over, color=[_colour(n) for n in names])
    if "lora_qv" in names:
        ax.axhline(over[names.index("lora_qv")], linestyle="--", color="black", linewidth=0.8)
    ax.set_title("peak training memory over its floor (MiB)\ndashed: LoRA r8 q,v (the target)")
    ax.tick_params(axis="x", rotation=60)
    fig.suptitle(f"{result['preset']} {result['dtype']} on {_machine(result)}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_quality(result: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vqa = "accuracy" in next(iter(result["runs"].values()))["curve"][0]
    key = "accuracy" if vqa else "held_out_loss"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"v2": "-", "lavin": "--", "v2_bias_scale": "-."}  # ours share a colour; the line tells them apart
    arms = result.get("benchmark") in ("quality_joint", "quality_expert")  # arms of one method: a colour each
    for i, (name, run) in enumerate(result["runs"].items()):
        steps = [p["step"] for p in run["curve"]]
        minutes = [p["train_cpu_s"] / 60 for p in run["curve"]]
        values = [p[key] for p in run["curve"]]
        label = f"{name} (lr {run['lr']:g})"
        colour = f"C{i}" if arms else _colour(name)
        style = dict(marker="o", markersize=3, label=label, color=colour, linestyle=styles.get(name, "-"))
        axes[0].plot(steps, values, **style)
        axes[1].plot(minutes, values, **style)
    for ax, xlabel in zip(axes, ("training steps", "training CPU minutes")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy" if vqa else "held-out loss")
        if vqa:
            ax.axhline(0.95, linestyle="--", color="black", linewidth=0.8)
            ax.axhline(0.25, color="grey", linewidth=0.5)
        ax.legend()
    title = "procedural instructions"
    benchmark = result.get("benchmark")
    if benchmark == "quality_joint":  # the right panel: what the instruction group learnt
        axes[1].clear()
        for name, run in result["runs"].items():
            steps = [p["step"] for p in run["curve"]]
            axes[1].plot(steps, [p["instruction_loss"] for p in run["curve"]], marker="o", markersize=3, label=name)
        axes[1].set_xlabel("training steps")
        axes[1].set_ylabel("held-out instruction loss")
        axes[1].legend()
        title = f"V2 joint / staged / all: visual QA ({', '.join(result['settings']['questions'])}) and instructions"
    elif benchmark == "quality_expert":
        title = "V2 with and without the OCR expert's reading as context: which word is written (4-way)"
    elif vqa:
        text_only = result["settings"].get("text_only_train_samples", 0)
        share = text_only / (result["settings"]["train_size"] + text_only)
        title = f"procedural visual QA (4-way), {share:.0%} of the tuning samples text only"
    fig.suptitle(f"{title}, SmolLM2-135M-Instruct, on {_machine(result)}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> list[Path]:
    written = []
    for path in sorted(Path(RESULTS_DIR).glob("*.json")):
        result = json.loads(path.read_text())
        kind = result.get("benchmark", "")
        timed = any(_metric(result) in row for row in result.get("train", {}).values())
        if kind == "speed" and timed:  # a `--memory-only` run has no timings to plot
            written.append(plot_speed(result, path.with_suffix(".png")))
        elif kind.startswith("quality_"):
            written.append(plot_quality(result, path.with_suffix(".png")))
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    argparse.ArgumentParser(
        description="Draw a PNG beside every speed and quality JSON in benchmarks/results/ (no options)."
    ).parse_args()
    main()
