"""Markdown tables from the result JSON files, written into benchmarks/README.md between the results markers.

python -m benchmarks.report
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR

README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / name
    return json.loads(path.read_text()) if path.exists() else None


def _provenance(result: dict[str, Any], after_command: str = "") -> list[str]:
    """The two lines above every table: the command that made `result` (then `after_command`) and its machine."""
    return [f"Command: `{result['command']}`{after_command}  ", f"Machine: {_machine(result)}.  "]


def _machine(result: dict[str, Any]) -> str:
    m = result["machine"]
    load = f"load average {m['load_average']} at start, {result.get('load_after')} at the end"
    device = m["device_name"] if m["device"] != "cpu" else f"{m['cpu']} ({m['cpu_cores']} cores, shared)"
    return (
        f"{device}, {m['torch_threads']} thread(s), {load}; torch {m['torch']}, transformers {m['transformers']}, "
        f"peft {m['peft']}, commit `{m['git_commit']}`"
    )


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f}–{max(values):.3f}" if values else "–"


def speed_tables(result: dict[str, Any]) -> str:
    metric = result.get("decisive_metric", "ratio_wall")
    spread = metric.replace("ratio_", "ratios_")
    lines = [
        *_provenance(result),
        f"Setting: {result['preset']}, {result['dtype']}, batch {result['settings']['batch']} × "
        f"{result['settings']['seq_len']} tokens (train), {result['settings']['gen_prompt']} prompt + "
        f"{result['settings']['gen_new']} new tokens (generate), {result['rounds']} rounds. Ratios are medians of "
        f"A-B-A paired ratios; `{metric}` decides the targets.",
        "",
        "| train step | trainable params | ratio (CPU time) | range over rounds | ratio (wall) | median s | "
        "peak memory MiB | saved activations MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["train"].items():
        peak = row.get("peak_bytes")
        saved = row.get("saved_activation_bytes")
        lines.append(
            f"| {name} (÷ {row['reference']}) | {row['trainable_params']:,} | {_fmt(row['ratio_cpu'])} | "
            f"{_spread(row.get(spread, []))} | {_fmt(row['ratio_wall'])} | {_fmt(row['median_wall_s'], 2)} | "
            f"{_fmt(peak / 2**20 if peak else None, 0)} | {_fmt(saved / 2**20 if saved is not None else None, 0)} |"
        )
    lines += [
        "",
        "| generate | tokens/s (wall) | ratio (CPU time) | range over rounds | ratio (wall) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in result["generate"].items():
        lines.append(
            f"| {name} (÷ {row['reference']}) | {_fmt(row['tokens_per_s'], 1)} | {_fmt(row['ratio_cpu'])} | "
            f"{_spread(row.get(spread, []))} | {_fmt(row['ratio_wall'])} |"
        )
    lines += ["", "| target | value | goal | met |", "|---|---:|---|---|"]
    for target in result.get("targets", []):
        lines.append(
            f"| {target['name']} | {target['value']} | {target['goal']} | {'yes' if target['met'] else '**no**'} |"
        )
    return "\n".join(lines)


def _eager_apart(compiled: dict[str, Any], eager: dict[str, Any] | None) -> str:
    """A sentence where the eager columns come from a run of another commit or AdamW than the compiled one."""
    if not eager:
        return ""
    runs = [(r["machine"]["git_commit"], r.get("adamw", "torch's default")) for r in (compiled, eager)]
    if runs[0] == runs[1]:
        return ""
    return (
        f" The eager columns are another run's (commit `{runs[1][0]}`, AdamW {runs[1][1]}; the compiled run: "
        f'`{runs[0][0]}`, {runs[0][1]}), so "compiled ÷ eager time" holds what changed between them too.'
    )


def compiled_table(compiled: dict[str, Any], eager: dict[str, Any] | None, kind: str = "train") -> str:
    """Train steps (or generate calls) under torch.compile beside the same in eager mode, each ÷ its floor (base)
    run the same way."""
    metric = compiled.get("decisive_metric", "ratio_wall")
    spread = metric.replace("ratio_", "ratios_")
    reference, what = ("floor", "train step") if kind == "train" else ("base", "generate, speed")
    lines = [
        *_provenance(compiled, f" (eager: `{eager['command']}`)" if eager else ""),
        f"Each ratio divides by the {reference} run the same way (eager ÷ eager {reference}, compiled ÷ compiled "
        f"{reference}); `{metric}`, medians of A-B-A paired ratios over {compiled['rounds']} rounds; the compiling "
        "warm-up round is not timed." + _eager_apart(compiled, eager),
        "",
        f"| {what} | eager ratio | compiled ratio | compiled range over rounds | eager median s | "
        "compiled median s | compiled ÷ eager time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in compiled[kind].items():
        before = (eager or {}).get(kind, {}).get(name, {})
        seconds = before.get("median_wall_s")
        speedup = row["median_wall_s"] / seconds if seconds else None
        lines.append(
            f"| {name} (÷ {row['reference']}) | {_fmt(before.get(metric))} | {_fmt(row[metric])} | "
            f"{_spread(row.get(spread, []))} | {_fmt(seconds, 2)} | {_fmt(row['median_wall_s'], 2)} | "
            f"{_fmt(speedup, 2)} |"
        )
    lines += ["", "| target (compiled) | value | goal | met |", "|---|---:|---|---|"]
    for target in compiled.get("targets", []):
        lines.append(
            f"| {target['name']} | {target['value']} | {target['goal']} | {'yes' if target['met'] else '**no**'} |"
        )
    return "\n".join(lines)


def recipe_table(result: dict[str, Any]) -> str:
    """The LaVIN-7B ScienceQA recipe at its effective batch: hours and memory per micro-batch × accumulation,
    LaVIN beside the frozen floor (`python -m benchmarks.projection`), each with the epochs shuffled and grouped by
    modality and length; a run of before the grouped simulation has one projection per row."""
    lavin, floor, effective = result["lavin"], result["floor"], result["effective_batch"]
    first = next((row for row in lavin["micro_batches"].values() if "projection" in row), {})
    arrangements = ["shuffled"] if "hours" in first.get("projection", {}) else list(first.get("projection", {}))

    def hours(row: dict[str, Any], arrangement: str) -> float | None:
        projection = row.get("projection", {})
        return projection.get("hours") if "hours" in projection else projection.get(arrangement, {}).get("hours")

    notes = []
    if result.get("reprojected_from"):
        notes.append(
            f"Step times measured by: `{result['measured_by']}` (`{result['reprojected_from']}`, on the machine "
            f"above); projected again at commit `{result.get('reprojected_at_commit')}`.  "
        )
    elif arrangements == ["shuffled"] and first:
        notes.append(
            "Simulated before the any-image rule (a micro-batch was charged in proportion to its images, while the "
            "encoder runs on each of its rows as soon as one has an image) and before the grouped batches; the "
            "re-projection of the same step times follows.  "
        )
    lines = [
        *_provenance(result),
        *notes,
        f"Effective batch {effective}; forward+backward times per micro-batch at padded text lengths "
        f"{', '.join(map(str, result['lengths']))} (median of {result['rounds']} rounds), one AdamW step "
        f"({_fmt(lavin['optimizer_s'], 4)} s, fused) per {effective} samples; compiled: "
        f"{result.get('compile_mode') or 'no'}. Epochs simulated with the assumed lengths (in the JSON).",
        "",
        "| micro-batch × accumulation | "
        + " | ".join(f"LaVIN h, {a}" for a in arrangements)
        + " | LaVIN peak GB (longest, images) | "
        + " | ".join(f"floor h, {a}" for a in arrangements)
        + " | floor peak GB |",
        "|---|" + "---:|" * (2 * len(arrangements) + 2),
    ]
    for m, row in lavin["micro_batches"].items():
        other = floor["micro_batches"].get(m, {})
        cells = [_fmt(hours(row, a), 2) for a in arrangements] + [_fmt(row.get("peak_gb"), 1)]
        cells += [_fmt(hours(other, a), 2) for a in arrangements] + [_fmt(other.get("peak_gb"), 1)]
        lines.append(f"| {m} × {effective // int(m)} | " + " | ".join(cells) + " |")
    arrangement = f", {lavin['best_arrangement']}" if lavin.get("best_arrangement") else ""
    floor_arrangement = f", {floor['best_arrangement']}" if floor.get("best_arrangement") else ""
    lines += [
        "",
        f"Fastest: LaVIN **{_fmt(lavin.get('best_hours'), 2)} h** at micro-batch {lavin['best_micro_batch']}"
        f"{arrangement} (goal ≤ {result['goal_hours']} h: {'met' if result['met'] else '**missed**'}); the floor "
        f"{_fmt(floor.get('best_hours'), 2)} h at micro-batch {floor['best_micro_batch']}{floor_arrangement}.",
    ]
    return "\n".join(lines)


def _today(p: dict[str, Any]) -> float:
    """Hours that `projection.project_hours` gives now for a `--preset 7b` run's step times and assumptions."""
    from .projection import ASSUMPTIONS, project_hours

    text, image = ({int(n): s for n, s in p["step_time_s"][kind].items()} for kind in ("text", "image"))
    return project_hours(text, image, {**ASSUMPTIONS, **p["assumptions"]})["hours"]


def projection_table(result: dict[str, Any]) -> str:
    """The LaVIN-7B ScienceQA projection and the 4 × 512 memory checks of a `--preset 7b` run."""
    p = result["projection"]
    times, projection = p["step_time_s"], p["projection"]
    lengths = [str(length) for length in p["lengths"]]
    lines = [
        f"LaVIN-7B ScienceQA recipe on one {result['machine']['device_name']}, projected from measured LaVIN step "
        f"times (batch {result['settings']['batch']}, AdamW, median of {p['rounds']} rounds):",
        "",
        "| text tokens | " + " | ".join(lengths) + " |",
        "|---|" + "---:|" * len(lengths),
        "| step s, text only | " + " | ".join(_fmt(times["text"][n]) for n in lengths) + " |",
        "| step s, with images | " + " | ".join(_fmt(times["image"][n]) for n in lengths) + " |",
        "",
        f"Projected: **{projection['hours']:.2f} h** for {p['assumptions']['train_samples']:,} samples × "
        f"{p['assumptions']['epochs']} epochs (goal ≤ {projection['goal_hours']} h: "
        f"{'met' if projection['met'] else '**missed**'}); dynamic padding adds "
        f"{projection['padding_overhead']:.0%} tokens; mean text length {projection['mean_text_tokens']:.0f} tokens "
        "(assumed distribution, in the JSON).",
        "",
        f"The same step times under today's simulation (`benchmarks.projection.project_hours`: a micro-batch with any "
        f"image costs the image step time, at its text length): **{_today(p):.2f} h**. The figure above is the run's "
        "own, which charged such a micro-batch in proportion to its images.",
        "",
        "| training step at 4 × 512, images | peak GB | allocated before the step GB | goal GB | met |",
        "|---|---:|---:|---:|---|",
    ]
    for key, entry in p["memory"].items():
        met = "–" if "goal_gb" not in entry else ("yes" if entry["met"] else "**no**")
        lines.append(
            f"| {key} | {_fmt(entry.get('peak_gb'), 1)} | {_fmt(entry.get('before_step_gb'), 1)} | "
            f"{entry.get('goal_gb', '–')} | {met} |"
        )
    return "\n".join(lines)


def dispatch_table(result: dict[str, Any]) -> str:
    """Wall time against kernel time and op counts per train step, from `benchmarks.profile`."""
    models = result["models"]
    floor = models.get("plain")
    lines = [
        *_provenance(result),
        "One train step each, run alone (not interleaved, so wall ratios are noisier than the speed tables'); "
        "ratios ÷ the floor (`plain`).",
        "",
        "| model | wall ms | kernel ms | kernels | aten ops | wall ÷ floor | kernel time ÷ floor | kernels ÷ floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in models.items():
        ratios = (
            [row["wall_s"] / floor["wall_s"], row["kernel_s"] / floor["kernel_s"], row["kernels"] / floor["kernels"]]
            if floor and floor["kernel_s"]
            else [None] * 3
        )
        lines.append(
            f"| {name} | {row['wall_s'] * 1e3:.1f} | {row['kernel_s'] * 1e3:.1f} | {row['kernels']:,} | "
            f"{row['aten_ops']:,} | " + " | ".join(_fmt(r, 2) for r in ratios) + " |"
        )
    return "\n".join(lines)


def _encoder(settings: dict[str, Any]) -> str:
    """The frozen encoder of a visual-QA run, in words."""
    if settings.get("encoder") == "scenes":
        return "frozen scene encoder pretrained on captions (`peft_mma.vision.scene_encoder`)"
    if settings.get("encoder") == "scenes_patches":
        return (
            "frozen scene encoder pretrained on captions, the mean of its patch tokens too "
            "(`peft_mma.vision.scene_encoder(patch_heads=True)`)"
        )
    return f"frozen random `{settings['vision_model']}` {settings['vision_kwargs']}"


def quality_tables(vqas: list[dict[str, Any]], instruction: dict[str, Any] | None) -> str:
    lines = []
    for vqa in vqas:
        settings = vqa["settings"]
        text_only = settings.get("text_only_train_samples", 0)
        captions = settings.get("caption_steps", 0)
        stage = (
            f"first {captions} steps on the scenes' captions for the visual path alone (LaVIN and V2; counted in the "
            "curve's steps), then "
            if captions
            else ""
        )
        answers = (
            '; answers state what the picture shows, then the letter (ScienceQA\'s "EA" format), scored by greedy '
            'generation ("stated": the share whose statement is right)'
            if settings.get("answer_format", "A") == "EA"
            else ""
        )
        precision = ", training under bf16 autocast (fp32 weights)" if settings.get("bf16") else ""
        lines += [
            *_provenance(vqa),
            f"Visual QA: {stage}{settings['steps']} steps × batch {settings['batch_size']}{precision}, held-out "
            f"{settings['eval_size']} questions{answers}, {_encoder(settings)}; {text_only} of the "
            f"{settings['train_size'] + text_only} tuning samples are text only. Prose loss: held-out English prose, "
            "text only (goal ≤ +2 %).",
            "",
            "| method | lr | trainable | accuracy by step | at the end, per question | best | ≥ 95 % at step "
            "(CPU min) | prose loss before → after |",
            "|---|---:|---:|---|---|---:|---|---|",
        ]
        for name, run in vqa["runs"].items():
            curve = " ".join(f"{p['step']}:{p['accuracy']:.2f}" for p in run["curve"])
            last = run["curve"][-1]
            kinds = [k.removeprefix("accuracy_") for k in last if k.startswith("accuracy_")]
            curve += " | " + ", ".join(f"{kind} {last['accuracy_' + kind]:.2f}" for kind in kinds)
            curve += f", stated {last['stated']:.2f}" if "stated" in last else ""
            reached = (
                f"{run['reached_goal_at_step']} ({run['reached_goal_at_cpu_min']:.1f})"
                if run["reached_goal_at_step"] is not None
                else "not reached"
            )
            change = f"{run['text_loss_before']:.3f} → {run['text_loss_after']:.3f} ({run['text_loss_change']:+.1%})"
            ratios = {"visual path": run.get("visual_lr_ratio", 1.0), "gates": run.get("gate_lr_ratio", 1.0)}
            apart = ", ".join(f"{part} × {ratio:g}" for part, ratio in ratios.items() if ratio != 1.0)
            lr = f"{run['lr']:g}" + (f" ({apart})" if apart else "")
            lines.append(
                f"| {name} | {lr} | {run['trainable_params']:,} | {curve} | {run['best_accuracy']:.2f} | "
                f"{reached} | {change} |"
            )
        lines.append("")
    if instruction:
        settings = instruction["settings"]
        lines += [
            "",
            *_provenance(instruction),
            f"Instructions: {settings['steps']} steps × batch {settings['batch_size']}, "
            f"held-out {settings['eval_size']}.",
            "",
            "| method | lr | trainable | held-out loss by step | exact match | train CPU min |",
            "|---|---:|---:|---|---:|---:|",
        ]
        for name, run in instruction["runs"].items():
            curve = " ".join(f"{p['step']}:{p['held_out_loss']:.3f}" for p in run["curve"])
            minutes = run["curve"][-1]["train_cpu_s"] / 60
            lines.append(
                f"| {name} | {run['lr']:g} | {run['trainable_params']:,} | {curve} | {run['exact_match']:.2f} | "
                f"{minutes:.1f} |"
            )
    return "\n".join(lines)


def joint_table(result: dict[str, Any]) -> str:
    """LLaMA-Adapter V2's joint training against the staged one (`benchmarks.quality --experiment joint`)."""
    settings = result["settings"]
    lines = [
        *_provenance(result),
        f"V2, {settings['steps']} steps × batch {settings['batch_size']}: {settings['image_train_samples']} image "
        f"questions ({', '.join(settings['questions'])}) and {settings['text_train_samples']} instructions; "
        f"held-out {settings['eval_size']} questions and {settings['instruction_eval_size']} instructions.",
        "",
        "| arm | visual QA accuracy by step | instruction loss by step | prose loss before → after |",
        "|---|---|---|---|",
    ]
    for name, run in result["runs"].items():
        accuracy = " ".join(f"{p['step']}:{p['accuracy']:.2f}" for p in run["curve"])
        instruction = " ".join(f"{p['step']}:{p['instruction_loss']:.2f}" for p in run["curve"])
        change = f"{run['text_loss_before']:.3f} → {run['text_loss_after']:.3f} ({run['text_loss_change']:+.1%})"
        lines.append(f"| {name} | {accuracy} | {instruction} | {change} |")
    return "\n".join(lines)


def expert_table(result: dict[str, Any]) -> str:
    """V2 with and without the OCR expert's reading as context (`benchmarks.quality --experiment expert`)."""
    settings = result["settings"]
    lines = [
        *_provenance(result),
        f'V2 on "which word is written" questions, {settings["steps"]} steps × batch {settings["batch_size"]} '
        f"({settings['train_size']} training questions, {settings['eval_size']} held out); expert: "
        f"{settings['expert']}, which reads {result['ocr_exact_held_out']:.0%} of the held-out words exactly "
        f"({result['ocr_wall_s']:.0f} s for all the images)."
        + (f" Lift at the end: {result['lift']:+.2f}." if result["lift"] is not None else ""),
        "",
        "| arm | accuracy by step | final |",
        "|---|---|---:|",
    ]
    for name, run in result["runs"].items():
        accuracy = " ".join(f"{p['step']}:{p['accuracy']:.2f}" for p in run["curve"])
        lines.append(f"| {name} | {accuracy} | {run['final_accuracy']:.2f} |")
    return "\n".join(lines)


def main() -> str:
    parts = []
    for name in ("speed_smollm2_cpu.json", "speed_7b_cuda.json", "speed_7b_cuda_h100.json"):
        result = _load(name)
        if result and "train" in result:
            parts.append(
                f"### Speed and memory: `{name}`\n\n![speed]({Path('results') / name.replace('.json', '.png')})\n\n"
                + speed_tables(result)
            )
            if "projection" in result:
                parts.append(f"### LaVIN-7B ScienceQA projection: `{name}`\n\n" + projection_table(result))
        for suffix in ("", "_fused"):  # torch's default AdamW (foreach on CUDA), the HF Trainer's fused one
            compiled_name = name.replace(".json", f"_compiled{suffix}.json")
            compiled = _load(compiled_name)
            if compiled and "train" in compiled:
                title = f"### Eager and compiled training: `{compiled_name}`\n\n"
                parts.append(title + compiled_table(compiled, result))
            decoding_name = name.replace(".json", f"_compiled{suffix}_generate.json")
            decoding = _load(decoding_name)
            if decoding and decoding.get("generate"):
                title = f"### Eager and compiled decoding: `{decoding_name}`\n\n"
                eager_decoding = _load(name.replace(".json", "_generate.json")) or result
                parts.append(title + compiled_table(decoding, eager_decoding, "generate"))
            graphs_name = name.replace(".json", f"_compiled_cudagraphs{suffix}.json")
            graphs = _load(graphs_name)
            if graphs and "train" in graphs:
                title = f"### Compiled training with CUDA graphs: `{graphs_name}`\n\n"
                parts.append(title + compiled_table(graphs, result))
    for name in ("recipe_7b_cuda_compiled.json", "recipe_7b_cuda_compiled_reprojected.json"):
        recipe = _load(name)
        if recipe:
            parts.append(f"### LaVIN-7B recipe at effective batch 32: `{name}`\n\n" + recipe_table(recipe))
    dispatch = _load("profile_train_7b_cuda.json")
    if dispatch:
        parts.append("### What a 7B train step launches on the GPU\n\n" + dispatch_table(dispatch))
    files = [*sorted(RESULTS_DIR.glob("quality_vqa*.json")), RESULTS_DIR / "quality_retention.json"]
    vqas = [json.loads(p.read_text()) for p in files if p.exists()]
    instruction = _load("quality_instruction.json")
    if vqas or instruction:
        names = [p.stem for p in sorted(RESULTS_DIR.glob("quality_*.json"))]
        plots = "".join(f"![{n}](results/{n}.png)\n" for n in names)
        parts.append("### Learning quality\n\n" + plots + "\n" + quality_tables(vqas, instruction))
    for name, title, table in (
        ("quality_joint.json", "V2's joint training against staged training", joint_table),
        ("quality_joint_fusion_all_joint.json", "V2's joint training, visual fusion in every layer", joint_table),
        (
            "quality_joint_fusion_all_all.json",
            "V2 trained whole on the same mix, visual fusion in every layer",
            joint_table,
        ),
        ("quality_expert.json", "V2 with an OCR expert", expert_table),
        ("quality_expert_steps120.json", "V2 with an OCR expert, a 120-step schedule", expert_table),
    ):
        result = _load(name)
        if result:
            parts.append(f"### {title}: `{name}`\n\n" + table(result))
    ablation = _load("ablation_v2_merged_generate.json")
    if ablation:
        rows = "\n".join(
            f"| {n} | {v:.3f} | {_spread(ablation['ratios_cpu'][n])} |" for n, v in ablation["ratio_cpu"].items()
        )
        parts.append(
            "### V2 merged generation, ablation\n\n"
            f"Command: `{ablation['command'].strip()}`  \nMachine: {_machine(ablation)}.\n\n"
            "| V2 merged, with | tokens/s ÷ plain base (CPU time) | range |\n|---|---:|---:|\n" + rows
        )
    body = "\n\n".join(parts)
    text = README.read_text()
    if START in text and END in text:
        text = text.split(START)[0] + START + "\n" + body + "\n" + END + text.split(END, 1)[1]
        README.write_text(text)
        print(f"updated {README}")
    return body


if __name__ == "__main__":
    argparse.ArgumentParser(
        description="Write the tables of benchmarks/README.md (between its markers) from the JSON results; no options."
    ).parse_args()
    main()
