"""The benchmarks run end to end on a tiny in-memory LLaMA and report every number (no timing assertions)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks/` is not installed; it runs from the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks import projection, speed  # noqa: E402
from benchmarks.models import GEN_VARIANTS, PRESETS, TRAIN_VARIANTS  # noqa: E402


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    speed.main(["--preset", "tiny", "--rounds", "1", "--no-memory", "--out", str(out)])
    return json.loads(out.read_text())


def test_speed_reports_every_variant_with_numbers(tiny_result):
    assert set(tiny_result["train"]) == set(TRAIN_VARIANTS)
    assert set(tiny_result["generate"]) == set(GEN_VARIANTS)
    for kind in ("train", "generate"):
        for name, row in tiny_result[kind].items():
            assert len(row["wall_s"]) == len(row["cpu_s"]) >= 1, name  # references: once per A-B-A pair
            assert row["median_wall_s"] > 0 and row["ratio_wall"] > 0 and row["ratio_cpu"] > 0, name
            assert row["reference"] in tiny_result[kind], name
    assert all(row["tokens_per_s"] > 0 for row in tiny_result["generate"].values())
    assert (
        tiny_result["train"]["floor"]["trainable_params"]
        == 0
        < tiny_result["train"]["lavin_image"]["trainable_params"]
    )


def test_speed_result_carries_machine_command_and_targets(tiny_result):
    machine = tiny_result["machine"]
    for key in ("cpu", "cpu_cores", "load_average", "torch", "transformers", "peft", "device_name"):
        assert key in machine
    assert tiny_result["command"].startswith("python -m benchmarks.speed --preset tiny")
    assert tiny_result["decisive_metric"] in ("ratio_cpu", "ratio_wall")
    names = {target["variant"] for target in tiny_result["targets"]}
    assert {"v2", "lavin_text", "lavin_image", "v2_merged", "lavin_text_merged", "lavin_image_merged"} <= names
    assert all(isinstance(target["met"], bool) for target in tiny_result["targets"])


def test_compiled_speed_runs_every_model_call_compiled_and_reports_beside_eager(tiny_result, tmp_path):
    from benchmarks.report import compiled_table

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = tmp_path / "compiled.json"
    variants = ["plain", "ia3", "v2", "lavin_text"]
    speed.main(["--preset", "tiny", "--rounds", "1", "--compile", "--variants", *variants, "--out", str(out)])
    result = json.loads(out.read_text())
    torch._dynamo.reset()
    assert (
        result["compiled"] and set(result["train"]) == {"floor", "ia3", "v2", "lavin_text"} and not result["generate"]
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= len(variants)  # each model call was compiled
    assert all(row["ratio_cpu"] > 0 and "peak_bytes" not in row for row in result["train"].values())
    goals = {(t["variant"], t["goal"].split()[1]) for t in result["targets"]}
    assert ("v2", "1.05") in goals and ("lavin_text", "ia3") in goals  # compiled goals: 1.05, and the compiled peers
    table = compiled_table(result, tiny_result)
    row = next(line for line in table.splitlines() if line.startswith("| v2 (÷ floor)"))
    eager, compiled = (float(cell) for cell in row.split("|")[2:4])
    assert eager == round(tiny_result["train"]["v2"]["ratio_cpu"], 3) and compiled == round(
        result["train"]["v2"]["ratio_cpu"], 3
    )


@pytest.mark.parametrize("key", ["v2", "lavin_image"])
def test_compiled_decoding_gives_the_eager_tokens_with_a_static_cache(key, monkeypatch):
    """`--compile --kinds generate` times `generate(cache_implementation="static")` with the forward it calls
    compiled: the same tokens as eager decoding, a static cache, and the class's forward again after each call."""
    preset = PRESETS["tiny"]
    base = speed.build_base(preset, torch.device("cpu"), torch.float32)
    inputs = speed.make_inputs(preset, base.config, torch.device("cpu"), torch.float32)
    model = speed.build_model(key, base, preset)
    eager = speed.generate_call(key, model, inputs, None)()
    caches = []
    generate = type(model.get_base_model()).generate
    monkeypatch.setattr(
        type(model.get_base_model()),
        "generate",
        lambda self, *a, **kw: caches.append(kw["generation_config"].cache_implementation) or generate(self, *a, **kw),
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = speed.generate_call(key, model, inputs, None, compile_mode="model")()
    stats = speed.compile_stats()
    torch._dynamo.reset()
    # prompt (with LaVIN's visual-token positions) + exactly gen_new tokens, the compiled ones the eager ones
    assert eager.shape[1] >= preset.gen_prompt + preset.gen_new and torch.equal(compiled, eager)
    assert caches == ["static"] and stats["unique_graphs"] >= 2 and stats["graph_breaks"] == 0  # prefill, steps
    assert "forward" not in vars(model.get_base_model())  # the instance's compiled forward lasted one call
    assert inputs.generation.cache_implementation is None  # the shared config is untouched


def test_compiled_decoding_reports_generation_targets_beside_eager(tiny_result, tmp_path):
    from benchmarks.report import compiled_table

    torch._dynamo.reset()
    out = tmp_path / "decoding.json"
    variants = ["plain", "v2", "v2_merged"]
    args = ["--preset", "tiny", "--rounds", "1", "--compile", "--kinds", "generate", "--variants", *variants]
    result = speed.main([*args, "--out", str(out)])
    torch._dynamo.reset()
    assert result["compiled"] and not result["train"] and set(result["generate"]) == {"base", "v2", "v2_merged"}
    assert result["compile_stats"]["graph_breaks"] == 0
    goals = {(t["variant"], t["goal"]) for t in result["targets"]}
    assert goals == {("v2", ">= 0.9"), ("v2_merged", ">= 0.97")}
    table = compiled_table(result, tiny_result, "generate")
    row = next(line for line in table.splitlines() if line.startswith("| v2 (÷ base)"))
    eager, compiled = (float(cell) for cell in row.split("|")[2:4])
    assert eager == round(tiny_result["generate"]["v2"]["ratio_cpu"], 3)
    assert compiled == round(result["generate"]["v2"]["ratio_cpu"], 3)
    cpu = torch.device("cpu")
    assert speed.default_out("smollm2", cpu, True, None, ["generate"]).endswith(
        "speed_smollm2_cpu_compiled_generate.json"
    )
    assert speed.parse_args(["--compile"]).kinds == ["train"] and speed.parse_args([]).kinds == ["train", "generate"]


def test_memory_probe_reports_peak_and_saved_activations():
    preset = PRESETS["tiny"]
    base = speed.build_base(preset, torch.device("cpu"), torch.float32)
    inputs = speed.make_inputs(preset, base.config, torch.device("cpu"), torch.float32)
    variant = speed.build_variants(["lora_qv"], base, preset, inputs)["lora_qv"]
    memory = speed.measure_memory(variant, torch.device("cpu"))
    assert memory["saved_activation_bytes"] > 0
    assert memory["peak_bytes"] is None or memory["peak_bytes"] >= memory["before_bytes"] > 0


def test_memory_only_reports_each_peak_over_its_floor_without_timing(tmp_path):
    out = tmp_path / "memory.json"
    result = speed.main(["--preset", "tiny", "--memory-only", "--variants", "plain", "v2", "--out", str(out)])
    assert json.loads(out.read_text())["train"].keys() == {"floor", "v2"} and "generate" not in result
    floor, v2 = result["train"]["floor"], result["train"]["v2"]
    assert v2["saved_activation_bytes"] > floor["saved_activation_bytes"] > 0
    if floor["peak_bytes"] is not None:  # the CPU timeline is a private profiler API: None where it is missing
        assert floor["peak_over_floor_mib"] == 0 and v2["peak_over_floor_mib"] == round(
            (v2["peak_bytes"] - floor["peak_bytes"]) / 2**20, 1
        )


def test_projection_simulates_the_recipe_from_step_times():
    text = {128: 1.0, 512: 4.0}  # seconds per micro-batch of 4
    image = {128: 2.0, 512: 5.0}
    out = projection.project_hours(text, image, {**projection.ASSUMPTIONS, "train_samples": 400, "epochs": 2})
    assert out["padding_overhead"] > 0 and out["hours"] > 0
    # 200 micro-batches of at least 64 tokens, each between the text-only and the all-image time
    assert 200 * 0.5 / 3600 < out["hours"] < 200 * 5.0 / 3600
    assert projection.interpolate(text, 320) == pytest.approx(2.5)
    assert projection.interpolate(text, 64) == 1.0 and projection.interpolate(text, 1024) == pytest.approx(8.0)
    lengths = projection.sample_lengths(1000, random.Random(0))
    assert all(64 <= length <= 512 for length, _ in lengths)


def test_a_micro_batch_with_any_image_costs_the_image_time():
    """The encoder runs on every row of a micro-batch that holds an image: with a text-only step of 1 s and an
    image step of 3 s, whatever the length, every micro-batch costs 1 s or 3 s, and only all-text ones 1 s."""
    a = {**projection.ASSUMPTIONS, "train_samples": 400, "epochs": 1, "image_fraction": 0.5}
    text, image = {64: 1.0, 512: 1.0}, {64: 3.0, 512: 3.0}
    for arrangement in projection.ARRANGEMENTS:
        out = projection.project_hours(text, image, a, micro_batch=4, arrangement=arrangement)
        seconds = out["hours"] * 3600
        rng = random.Random(0)
        flags = [has for _, has in projection.sample_lengths(400, rng, a)]
        images = sum(flags)
        # between every micro-batch with one image at least (3 s each) and images packed 4 to a micro-batch
        assert 100 * 1.0 + -(-images // 4) * 2.0 <= seconds + 1e-9, arrangement
        assert seconds <= 100 * 3.0 + 1e-9
        if arrangement == "shuffled":  # 1 - 0.5⁴ of random micro-batches hold an image
            assert seconds > 100 + 2.0 * 0.85 * 100
        else:  # grouped by modality: about half the micro-batches hold images, a few both
            assert seconds == pytest.approx(100 + 2.0 * 100 * (images / 400 + out["mixed_micro_batches"]), rel=0.03)


def test_an_image_micro_batch_is_looked_up_at_its_text_length():
    """The image step times are keyed by the text's length and were timed with the visual tokens in front: a
    micro-batch of image samples of L text tokens (padded to L + 6) costs image[L], not image[L + 6]."""
    a = {**projection.ASSUMPTIONS, "train_samples": 40, "epochs": 1, "image_fraction": 1.0, "length_sigma": 0.0}
    (length, _), *_ = projection.sample_lengths(1, random.Random(0), a)
    text, image = {100: 1.0, 300: 3.0}, {100: 1.0, 300: 3.0}  # seconds = length / 100
    out = projection.project_hours(text, image, a, micro_batch=4)
    assert out["hours"] * 3600 == pytest.approx(10 * length / 100)


def test_grouped_epochs_pad_less_and_mix_modalities_less():
    a = {**projection.ASSUMPTIONS, "train_samples": 3200, "epochs": 2}
    text, image = {128: 1.0, 512: 4.0}, {128: 1.5, 512: 4.5}
    shuffled, grouped = (
        projection.project_hours(text, image, a, micro_batch=16, effective_batch=32, arrangement=arrangement)
        for arrangement in projection.ARRANGEMENTS
    )
    assert shuffled["arrangement"] == "shuffled" and grouped["arrangement"] == "grouped"
    assert shuffled["padding_overhead"] > 0.5 > 0.05 > grouped["padding_overhead"] >= 0
    assert shuffled["mixed_micro_batches"] > 0.95 and grouped["mixed_micro_batches"] < 0.03
    assert grouped["hours"] < 0.7 * shuffled["hours"]
    assert shuffled["mean_text_tokens"] == grouped["mean_text_tokens"]  # the same samples
    with pytest.raises(ValueError, match="arrangement must be one of"):
        projection.project_hours(text, image, a, arrangement="sorted")


def test_recipe_at_the_effective_batch_counts_micro_batches_and_optimizer_steps():
    flat = {32: 1.0, 1024: 1.0}  # one second per micro-batch, whatever its length
    a = {**projection.ASSUMPTIONS, "train_samples": 400, "epochs": 2}
    for arrangement in projection.ARRANGEMENTS:
        # 400 samples: 13 optimizer steps of ≤ 32 per epoch (12 full, one of 16), cut into 50 micro-batches of 8
        out = projection.project_hours(
            flat, flat, a, micro_batch=8, effective_batch=32, optimizer_s=3.0, arrangement=arrangement
        )
        assert out["hours"] == pytest.approx(2 * (13 * 3.0 + 50 * 1.0) / 3600)
    # by default every micro-batch of 4 is a step whose time includes the optimizer: the earlier simulation
    assert projection.project_hours(flat, flat, a)["hours"] == pytest.approx(2 * 100 / 3600)
    with_accumulation = projection.project_hours(flat, flat, a, micro_batch=4, effective_batch=32)
    assert with_accumulation["hours"] == pytest.approx(2 * 100 / 3600)


def test_recipe_sweep_projects_each_micro_batch_and_picks_the_fastest(tmp_path):
    out = tmp_path / "recipe.json"
    argv = [
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--micro-batches",
        "2",
        "4",
        "--lengths",
        "8",
        "16",
        "--rounds",
        "1",
    ]
    result = projection.main([*argv, "--out", str(out)])
    assert json.loads(out.read_text())["effective_batch"] == projection.EFFECTIVE_BATCH == 32
    for name in ("lavin", "floor"):
        rows = result[name]["micro_batches"]
        assert set(rows) == {2, 4}
        for row in rows.values():
            assert all(t > 0 for kind in ("text", "image") for t in row[kind].values())
            assert set(row["projection"]) == set(projection.ARRANGEMENTS)
            assert all(p["hours"] > 0 for p in row["projection"].values())
            assert row["peak_gb"] is None or row["peak_gb"] > 0
        hours = {(m, a): p["hours"] for m, row in rows.items() for a, p in row["projection"].items()}
        best = min(hours, key=hours.get)
        assert (result[name]["best_micro_batch"], result[name]["best_arrangement"]) == best
        assert result[name]["best_hours"] == hours[best]
    assert result["lavin"]["optimizer_s"] > 0 and result["floor"]["optimizer_s"] == 0
    assert result["met"] == (result["lavin"]["best_hours"] <= projection.GOAL_HOURS)
    with pytest.raises(SystemExit):  # 3 does not divide 32
        projection.main(["--preset", "tiny", "--device", "cpu", "--micro-batches", "3"])

    # the same step times projected again, measuring nothing: equal hours, the measured run named
    again = tmp_path / "again.json"
    reprojected = projection.main(["--reproject", str(out), "--out", str(again)])
    assert reprojected["measured_by"] == result["command"] and reprojected["reprojected_from"] == str(out)
    assert reprojected["machine"] == result["machine"] and "elapsed_s" in reprojected
    for name in ("lavin", "floor"):
        for m, row in result[name]["micro_batches"].items():
            for a, p in row["projection"].items():
                assert reprojected[name]["micro_batches"][m]["projection"][a]["hours"] == pytest.approx(p["hours"])
    with pytest.raises(SystemExit):  # --reproject writes a new file, never over the measured one
        projection.main(["--reproject", str(out)])

    from benchmarks.report import recipe_table

    for shown in (result, reprojected):
        table = recipe_table(shown)
        assert "LaVIN h, shuffled | LaVIN h, grouped" in table
        assert f"micro-batch {result['lavin']['best_micro_batch']}, {result['lavin']['best_arrangement']}" in table
    assert "Step times measured by" in recipe_table(reprojected)


@pytest.mark.parametrize("name, graphs", [("lavin_text", 1), ("v2", 2)])
def test_regional_compilation_shares_the_layers_graph_and_keeps_loss_and_gradients(name, graphs):
    from benchmarks.common import compile_layers
    from benchmarks.models import build_model

    preset = PRESETS["tiny"]
    base = speed.build_base(preset, torch.device("cpu"), torch.float32)
    model = build_model(name, base, preset)
    model.eval()  # no dropout: eager and compiled see the same function
    ids = torch.randint(3, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    eager_loss, eager_grads = loss_and_grads()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_layers(model)
    loss, grads = loss_and_grads()
    stats = speed.compile_stats()
    torch._dynamo.reset()
    assert torch.allclose(loss, eager_loss, atol=1e-5)
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(grads, eager_grads))
    # three decoder layers: LaVIN's share one graph; V2's first layer (its input needs no gradient) has its own
    assert base.config.num_hidden_layers == 3 and stats == {"unique_graphs": graphs, "graph_breaks": 0}


def test_compile_mode_without_compile_is_refused_and_names_its_own_file():
    with pytest.raises(SystemExit):
        speed.parse_args(["--compile-mode", "reduce-overhead"])
    args = speed.parse_args(["--compile", "layers", "--compile-mode", "reduce-overhead"])
    assert (args.compile, args.compile_mode) == ("layers", "reduce-overhead")
    cpu = torch.device("cpu")
    assert speed.default_out("7b", cpu, True, "reduce-overhead").endswith("speed_7b_cpu_compiled_cudagraphs.json")
    assert speed.default_out("7b", cpu, True).endswith("speed_7b_cpu_compiled.json")
    assert speed.default_out("7b", cpu).endswith("speed_7b_cpu.json")


def test_7b_refuses_to_build_on_the_cpu():
    with pytest.raises(SystemExit, match="needs --device cuda"):
        speed.main(["--preset", "7b", "--device", "cpu"])


def test_projection_measures_steps_checkpointing_and_4bit_on_a_tiny_model():
    preset = PRESETS["tiny"]
    base = speed.build_base(preset, torch.device("cpu"), torch.float32)
    out = projection.measure_projection(base, preset, torch.device("cpu"), torch.float32, rounds=1)
    assert set(out["step_time_s"]) == {"text", "image"} and out["projection"]["hours"] > 0
    for key in ("no_checkpointing", "checkpointing", "4bit_checkpointing"):
        assert "peak_gb" in out["memory"][key] or "error" in out["memory"][key], key


class _CharTokenizer:
    """One id per character: enough for `quality.general_text`, which only tokenizes."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def test_general_text_is_fixed_prose_from_python_docs():
    from benchmarks import quality

    chunks = quality.general_text(_CharTokenizer(), count=6, length=50)
    again = quality.general_text(_CharTokenizer(), count=6, length=50)
    assert chunks.shape == (6, 50) and torch.equal(chunks, again)
    text = "".join(map(chr, chunks.flatten().tolist()))
    assert "::=" not in text and ">>>" not in text  # grammar rules and code are left out
    assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.85
    with pytest.raises(ValueError, match="fewer than"):
        quality.general_text(_CharTokenizer(), count=10**6, length=64)


def test_prose_loss_is_the_base_models_loss_at_init():
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks import quality
    from benchmarks.quality_methods import Method

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 200, (5, 12))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert quality.prose_loss(Method("base", model), ids, batch=2) == pytest.approx(float(expected), rel=1e-5)


def test_profile_counts_dispatched_ops(tmp_path, monkeypatch):
    """The op counts behind the GPU diagnosis: every model's step dispatches ops, an adapter adds some, and forcing
    AdamW's foreach path (what CUDA runs) needs fewer ops than the CPU's per-tensor loop for many tensors."""
    from benchmarks import profile

    monkeypatch.setattr(profile, "RESULTS_DIR", tmp_path)
    counts = {}
    for adamw in ("default", "foreach"):
        profile.main(["--preset", "tiny", "--models", "plain", "v2", "--adamw", adamw, "--no-tables", "--tag", adamw])
        result = json.loads((tmp_path / f"profile_train_{adamw}.json").read_text())
        assert result["adamw"] == adamw and result["command"].startswith("python -m benchmarks.profile")
        counts[adamw] = {name: row["aten_ops"] for name, row in result["models"].items()}
        assert all(row["wall_s"] > 0 and row["kernels"] == 0 for row in result["models"].values())  # CPU
    assert not list(tmp_path.glob("*.txt"))
    assert 0 < counts["default"]["plain"] < counts["default"]["v2"]
    assert counts["foreach"]["v2"] < counts["default"]["v2"]  # V2 steps ~90 tensors here


def test_profile_splits_cpu_time_and_names_compiled_kernels(tmp_path, monkeypatch):
    """On the CPU the summary splits the profiled step's self time into groups: eager, no inductor kernel and the
    optimizer's time grows with the tensors it steps; compiled, inductor's fused C++ kernels appear as events."""
    from benchmarks import profile

    monkeypatch.setattr(profile, "RESULTS_DIR", tmp_path)
    profile.main(["--preset", "tiny", "--models", "plain", "v2", "--no-tables", "--tag", "eager"])
    profile.main(["--preset", "tiny", "--models", "plain", "--compile", "--no-tables", "--tag", "compiled"])
    eager = json.loads((tmp_path / "profile_train_eager.json").read_text())["models"]
    compiled = json.loads((tmp_path / "profile_train_compiled.json").read_text())["models"]["plain"]["self_cpu_s"]
    groups = {"optimizer", "matmul", "attention", "fused", "other"}
    assert set(eager["v2"]["self_cpu_s"]) == set(compiled) == groups
    assert eager["plain"]["self_cpu_s"]["fused"] == eager["v2"]["self_cpu_s"]["fused"] == 0
    assert eager["plain"]["self_cpu_s"]["matmul"] > 0 and eager["plain"]["self_cpu_s"]["attention"] > 0
    assert eager["v2"]["self_cpu_s"]["optimizer"] > eager["plain"]["self_cpu_s"]["optimizer"]  # ~90 tensors
    assert compiled["fused"] > 0 and compiled["matmul"] > 0


def test_profile_totals_what_autograd_keeps_by_shape(tmp_path, monkeypatch):
    """`--saved-tensors`: the bytes by shape add up to the total, and V2 keeps what the floor does not, among it
    one output of every scaled q_proj: (batch, length, width) in fp32, per layer."""
    from benchmarks import profile
    from benchmarks.models import PRESETS

    monkeypatch.setattr(profile, "RESULTS_DIR", tmp_path)
    profile.main(["--preset", "tiny", "--models", "plain", "v2", "--saved-tensors", "--no-tables", "--tag", "kept"])
    rows = json.loads((tmp_path / "profile_train_kept.json").read_text())["models"]
    for row in rows.values():
        assert sum(row["saved_mib_by_shape"].values()) == pytest.approx(row["saved_mib"])
    assert rows["v2"]["saved_mib"] > rows["plain"]["saved_mib"] > 0
    preset = PRESETS["tiny"]
    hidden = f"{preset.batch}x{preset.seq_len}x{preset.llama['hidden_size']}"
    layer_output = preset.batch * preset.seq_len * preset.llama["hidden_size"] * 4 / 2**20
    extra = rows["v2"]["saved_mib_by_shape"][hidden] - rows["plain"]["saved_mib_by_shape"].get(hidden, 0.0)
    assert extra >= preset.llama["num_hidden_layers"] * layer_output * (1 - 1e-9)


def test_nodes_compare_each_adapter_node_with_the_frozen_op_it_adapts(tmp_path):
    """`benchmarks.nodes` times like against like: at init every adapted node computes its frozen counterpart's
    output (scale 1, bias 0, tuned norm weight 1), LaVIN's adapter as before (float32, rows h + 1) and now agree
    to float32 precision, and the JSON carries every case's times and each method's cost per train step."""
    from benchmarks import nodes
    from peft_mma.lavin import function

    cases = nodes.cases("tiny", torch.device("cpu"), torch.float32)
    by_name = {case.name: case for case in cases}
    for case in cases:
        if case.frozen is not None:
            torch.testing.assert_close(case.adapted(*case.inputs), case.frozen(*case.inputs), atol=1e-6, rtol=1e-6)
    lavin, before = by_name["lavin_adapter"], by_name["lavin_adapter_before"]
    torch.manual_seed(0)
    now = lavin.adapted(*lavin.inputs)
    function.ROW_MULTIPLE, multiple = 1, function.ROW_MULTIPLE
    try:
        torch.manual_seed(0)  # the same dropout mask
        then = before.adapted(*before.inputs)
    finally:
        function.ROW_MULTIPLE = multiple
    torch.testing.assert_close(now, then, atol=1e-6, rtol=1e-6)

    out = tmp_path / "nodes.json"
    nodes.main(["--preset", "tiny", "--reps", "2", "--no-compile", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["cases"]) == set(by_name) and result["command"].startswith("python -m benchmarks.nodes")
    for row in result["cases"].values():
        assert row["eager"]["adapted_s"] > 0 and row["per_step"] > 0 and "compiled" not in row
    assert set(result["added_per_step_s"]) == {"v2", "lavin", "lavin_before"}


def test_7b_layout_has_the_7b_layers_heads_and_vocabulary():
    layout, full = PRESETS["7b_layout"].llama, PRESETS["7b"].llama
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert layout[key] == full[key]
    assert layout["hidden_size"] < full["hidden_size"]
    assert layout["intermediate_size"] / layout["hidden_size"] == full["intermediate_size"] / full["hidden_size"]


def test_blind_baseline_never_reads_the_image_and_lavin_does():
    """The visual-QA baselines: `blind` gives the same logits whatever the image, LaVIN's change with it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.quality_methods import build_method, encoder

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1
    )
    base = LlamaForCausalLM(config).eval()
    vision = encoder("random")
    assert (vision.image_size, vision.pretrained, vision.lavin_every) == (64, False, 1)
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "has_image": torch.tensor([True, True])}
    images = [torch.rand(2, 3, 64, 64) for _ in range(2)]
    for name, reads in (("blind", False), ("lavin", True)):
        method = build_method(name, base, multimodal=True, vision=vision).eval()
        with torch.no_grad():
            a, b = (method.logits(batch | {"pixel_values": image}, 2) for image in images)
        assert torch.equal(a, b) is not reads, name


def test_routing_summary_reads_lavins_routes_and_how_far_its_up_paths_are_apart():
    """`quality.routing_summary`, the retention diagnostic: at init (both up-paths zero) the paths are not apart at
    all; the text and image rows are LaVIN's own `modality_routing`; other methods give nothing."""
    from conftest import config_for, model_for

    from benchmarks import quality
    from benchmarks.quality_methods import Method

    model = model_for("lavin-image", init_weights=True)
    summary = quality.routing_summary(Method("lavin", model, multimodal=True))
    routes = torch.stack(list(model.base_model.modality_routing().values()))  # (adapters, modality, path)
    assert summary["up_paths_apart"] == 0.0
    assert summary["route_text_w0"] == pytest.approx(float(routes[:, 0, 0].mean()))
    assert summary["route_image_w0"] == pytest.approx(float(routes[:, 1, 0].mean()))
    assert summary["route_gap_max"] == pytest.approx(float((routes[:, 1, 0] - routes[:, 0, 0]).abs().max()))
    apart = quality.routing_summary(Method("lavin", model_for("lavin-image"), multimodal=True))["up_paths_apart"]
    assert 0 < apart < 2  # random non-identity paths differ
    no_bias = model_for("lavin-image", adapter_bias=False)  # up-paths without biases: their weights alone
    ups = [m for m in no_bias.modules() if getattr(m, "routing", None) == "sample"]
    pairs = [(m.mma_lavin_up0["default"].weight.detach(), m.mma_lavin_up1["default"].weight.detach()) for m in ups]
    expected = sum(float((a - b).pow(2).sum()) for a, b in pairs) ** 0.5
    expected /= sum(float(a.norm() + b.norm()) ** 2 for a, b in pairs) ** 0.5
    got = quality.routing_summary(Method("lavin", no_bias, multimodal=True))["up_paths_apart"]
    assert got == pytest.approx(expected, rel=1e-6) and got > 0
    assert quality.routing_summary(Method("v2", model_for("v2-image"), multimodal=True)) == {}
    assert config_for("lavin-image").temperature == 10.0  # the official 7B value the retention runs compare with


def _tiny_method_on_captions(name: str):
    """(method, four captioned random images, a left-padding collator) on a tiny random LLaMA and encoder."""
    from stand_in_tokenizer import word_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks import quality
    from benchmarks.quality_methods import build_method, encoder
    from peft_mma.data.collator import CausalLMCollator

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1
    )
    base = LlamaForCausalLM(config).eval()
    base.requires_grad_(False)
    vision = encoder("random")
    method = build_method(name, base, multimodal=True, vision=vision)
    captions = [
        {"image": torch.rand(3, 64, 64), "prompt": quality.CAPTION_PROMPT, "response": f"the word {word}"}
        for word in ("CAT", "DOG", "SUN", "BOX")
    ]
    tokenizer = word_tokenizer([quality.CAPTION_PROMPT, "the word CAT DOG SUN BOX"], add_bos=True)
    collator = CausalLMCollator(tokenizer, max_length=32, padding_side="left", image_size=vision.image_size)
    return method, captions, collator


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("name", ["lavin", "v2"])
def test_caption_stage_trains_the_visual_path_alone(name, bf16):
    """`quality.caption_stage` (LLaVA's stage 1): the visual path changes (LaVIN's projector; V2's bridge, prompts
    and gates), every other parameter stays bitwise and trainable again afterwards, and the curve has a point per
    evaluation; with `--bf16` the same, the forward passes computed in bf16 (the LM head's logits) and the weights
    kept in fp32."""
    import argparse

    from benchmarks import quality
    from peft_mma.llama_adapter_v2.joint import joint_parameter_groups
    from peft_mma.optim import visual_path_parameters

    method, captions, collator = _tiny_method_on_captions(name)
    trainable = dict((n, p) for n, p in method.model.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    visual = joint_parameter_groups(method.model)["visual"] if name == "v2" else visual_path_parameters(method.model)
    visual_names = {n for n, p in trainable.items() if any(p is v for v in visual)}
    assert visual_names and len(visual_names) < len(trainable)

    args = argparse.Namespace(caption_steps=3, batch_size=2, seed=0, eval_every=1, bf16=bf16)
    dtypes = []
    head = method.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, inputs, out: dtypes.append(out.dtype))
    curve = quality.caption_stage(method, captions, collator, 1e-2, 1.0, lambda: {"accuracy": 0.25}, args)
    hook.remove()
    assert set(dtypes) == {torch.bfloat16 if bf16 else torch.float32}
    assert {p.dtype for p in trainable.values()} == {torch.float32}

    assert [p["step"] for p in curve] == [0, 1, 2, 3] and curve[-1]["train_loss"] > 0
    changed = {n for n, p in trainable.items() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= visual_names  # nothing outside the visual path moved
    assert all(p.requires_grad for p in trainable.values())  # the rest is trainable again for the next stage


@pytest.mark.parametrize("name", ["lavin", "v2", "lora_projector", "blind"])
def test_greedy_decoding_with_the_cache_gives_the_tokens_of_full_recomputation(name):
    """`Method.greedy` (`generate`, KV cache) picks the tokens that recomputing each method's own `logits` over the
    whole sequence picks, pads a row after its EOS and stops once every row has given EOS."""
    from types import SimpleNamespace

    from conftest import greedy_without_cache
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.quality_methods import build_method, encoder

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1
    )
    base = LlamaForCausalLM(config).eval()
    method = build_method(name, base, multimodal=True, vision=encoder("random")).eval()
    for p in method.parameters():  # the zero-init adapters made visible
        p.data.add_(torch.randn_like(p) * 0.05) if p.requires_grad else None
    ids = torch.tensor([[1, 5, 6, 7, 9], [0, 0, 1, 8, 10]])  # left padded
    batch = {
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "has_image": torch.tensor([True, True]),
        "pixel_values": torch.rand(2, 3, 64, 64),
    }

    def full_forward(**inputs):  # the method's own logits of the whole sequence, for `greedy_without_cache`
        return SimpleNamespace(logits=method.logits(inputs, 1))

    def check(eos: int) -> torch.Tensor:  # the cached tokens are the recomputed ones, and nothing is cut short
        got = method.greedy(batch, 6, eos, 0)
        expected = greedy_without_cache(full_forward, batch, 6, eos=eos, pad=0)[:, ids.shape[1] :]
        assert torch.equal(got, expected[:, : got.shape[1]]) and (expected[:, got.shape[1] :] == 0).all()
        return got

    with torch.no_grad():  # a row's logits do not depend on its left padding (V2's prompts have no position)
        padded = method.logits(batch, 3)[1]
        alone = method.logits(
            {k: v[1:, 2:] if k in ("input_ids", "attention_mask") else v[1:] for k, v in batch.items()}, 3
        )
    torch.testing.assert_close(padded, alone[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the kept positions (asked for by index) are the whole sequence's last ones
        whole = method.model(**method.inputs(batch), use_cache=False).logits
    assert whole.shape[1] > 3
    torch.testing.assert_close(method.logits(batch, 3), whole[:, -3:], rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # on text alone, the method without images: as if its batch had no image
        text = method.text_logits({k: batch[k] for k in ("input_ids", "attention_mask")}, 3)
        no_image = method.logits(batch | {"has_image": torch.tensor([False, False])}, 3)
    torch.testing.assert_close(text, no_image, rtol=1e-5, atol=1e-5)
    free = check(eos=63)
    assert free.shape[1] == 6
    eos = int(free[0, 0])  # row 0 stops at once, row 1 goes on
    stopped = check(eos)
    assert stopped.shape[1] > 1 and stopped[0, 0] == eos and (stopped[0, 1:] == 0).all()


def test_a_second_stage_counts_on_from_the_first():
    from benchmarks import quality

    last = {"step": 80, "train_wall_s": 10.0, "train_cpu_s": 9.0, "accuracy": 0.5}
    point = {"step": 40, "train_wall_s": 4.0, "train_cpu_s": 3.0, "accuracy": 0.7}
    assert quality.continued(point, last) == {"step": 120, "train_wall_s": 14.0, "train_cpu_s": 12.0, "accuracy": 0.7}
    args = quality.parse_args(["--set", "temperature=1.0", "adapter_dim=4", "vision_model=abc"])
    assert args.overrides == {"temperature": 1.0, "adapter_dim": 4, "vision_model": "abc"}
    with pytest.raises(SystemExit):
        quality.parse_args(["--set", "temperature"])


def test_plot_skips_memory_only_runs_and_draws_train_only_ones(tmp_path, monkeypatch):
    from benchmarks import plot

    row = {"ratio_cpu": 1.1, "ratios_cpu": [1.0, 1.2]}
    runs = {
        "memory": {"benchmark": "speed", "train": {"floor": {"peak_over_floor_mib": 0.0}}},  # --memory-only
        "compiled": {"benchmark": "speed", "decisive_metric": "ratio_cpu", "train": {"floor": row, "v2": row}},
    }
    header = {
        "preset": "tiny",
        "dtype": "fp32",
        "machine": {"device_name": "cpu", "torch_threads": 1, "load_average": 1},
    }
    for name, result in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({**header, **result}))
    monkeypatch.setattr(plot, "RESULTS_DIR", tmp_path)
    assert plot.main() == [tmp_path / "compiled.png"]  # no generation panel to draw: it says so
    assert (tmp_path / "compiled.png").stat().st_size > 0 and not (tmp_path / "memory.png").exists()


def _char_tokenizer():
    """One token per character, decoded back without spaces: what a scripted model's answers need."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *string.printable])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def test_generated_vqa_accuracy_scores_the_letter_of_the_greedy_answer():
    """`--answer-format EA`: the letter of the model's own answer counts, after its statement, when it is the only
    letter named; `stated` is the share of answers that start with the right statement; decoding sees the prompts
    alone, and what follows EOS does not count."""
    from benchmarks import quality
    from benchmarks.quality_methods import Method
    from peft_mma.data.collator import CausalLMCollator
    from peft_mma.data.scenes import scene_qa_dataset

    tokenizer = _char_tokenizer()
    kinds = ["colour", "shape", "position", "count", "larger"]
    samples = scene_qa_dataset(5, seed=0, questions=kinds, explained=True)  # one sample per kind
    wrong = {"A": "B", "B": "C", "C": "D", "D": "A"}
    scripts = {  # sample index → its scripted answer (then EOS, then `after_eos`, which must not count)
        0: f"{samples[0]['explanation']} The answer is {samples[0]['answer']}.",  # right statement and letter
        1: f"{samples[1]['explanation']} The answer is {wrong[samples[1]['answer']]}.",  # wrong letter
        2: f"It is something. The answer is {samples[2]['answer']}.",  # wrong statement, right letter
        3: "I do not know.",  # no letter at all (one follows EOS)
        4: f"{samples[4]['explanation']} The answer is {samples[4]['answer']}. "
        f"The answer is {wrong[samples[4]['answer']]}.",  # the right letter and a wrong one: a hedge, not a hit
    }
    prompts = {quality.prompt_and_response(s)[0]: i for i, s in enumerate(samples)}
    after_eos = tokenizer(f"The answer is {samples[3]['answer']}." * 9)["input_ids"]  # sample 3's letter, too late

    class Scripted(Method):
        def __init__(self):
            super().__init__("scripted", torch.nn.Identity())

        def greedy(self, batch, max_new_tokens, eos_id, pad_id):
            assert "labels" not in batch and eos_id == tokenizer.eos_token_id
            rows = []
            for ids in batch["input_ids"].tolist():
                prompt = tokenizer.decode([i for i in ids if i != tokenizer.pad_token_id])
                script = tokenizer(scripts[prompts[prompt]], add_special_tokens=False)["input_ids"]
                rows.append((script + [eos_id] + after_eos)[:max_new_tokens])
            return torch.tensor(rows)

    collator = CausalLMCollator(tokenizer, padding_side="left", with_response=False, image_size=64)
    out = quality.generated_vqa_accuracy(Scripted(), samples, collator, batch=5, max_new_tokens=80)
    assert out["accuracy"] == 0.4 and out["stated"] == 0.6
    assert [out[f"accuracy_{kind}"] for kind in kinds] == [1.0, 0.0, 1.0, 0.0, 0.0]
    with pytest.raises(SystemExit):  # the other experiments score teacher-forced letters only
        quality.parse_args(["--experiment", "joint", "--answer-format", "EA"])


def test_visual_probe_reads_what_each_method_hands_its_llm():
    """`benchmarks.visual_probe`'s features are the encoder's tokens, V2's V as its forward computes it, and LaVIN's
    visual tokens as its forward places them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.quality_methods import build_method, encoder
    from benchmarks.visual_probe import FEATURES, feature_functions

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1
    )
    base = LlamaForCausalLM(config).eval()
    vision = encoder("random")
    functions = feature_functions(base, vision, seed=0)
    assert tuple(functions) == FEATURES
    images = torch.rand(3, 3, 64, 64)
    features = {name: fn(images) for name, fn in functions.items()}
    assert features["encoder_class_token"].shape == features["encoder_token_mean"].shape == (3, 128)
    v2 = build_method("v2", base, multimodal=True, seed=0, vision=vision, visual_fusion="all").eval()
    with torch.no_grad():
        expected = v2.model.base_model._visual_tokens(images, None, 3)["default"]  # what V2's forward adds
    torch.testing.assert_close(features["v2_visual_tokens"], expected)
    assert features["lavin_visual_tokens"].shape == (3, 4, 32)  # the class token after each of the 4 blocks


def test_quality_report_names_the_encoder_and_mixed_precision():
    """`report.quality_tables` says which scene encoder a run read (the patch-headed one by its name, not as a
    random timm model) and that it trained under bf16 autocast when it did."""
    import json

    from benchmarks import report
    from benchmarks.common import RESULTS_DIR

    path = RESULTS_DIR / "quality_vqa_scenes_all_kinds_v2_fusion_all_visual_only_ea_scenes_patches_bf16_steps290.json"
    result = json.loads(path.read_text())
    text = report.quality_tables([result], None)
    assert "training under bf16 autocast (fp32 weights)" in text and "patch_heads=True" in text
    assert "frozen random" not in text
    assert "| v2 | 0.002 | 1,196,421 | 0:0.00 145:0.86 290:0.98 |" in text
    result["settings"] |= {"bf16": False, "encoder": "scenes"}
    text = report.quality_tables([result], None)
    assert "bf16 autocast" not in text and "(`peft_mma.vision.scene_encoder`)" in text


def test_compiled_recipe_runs_over_three_lengths(tmp_path):
    """`gpu.sh`'s recipe part compiles each layer for dynamic shapes: its third length is the first that runs the
    dynamic graph (LaVIN's sliced attention inputs once failed a stride check there)."""
    argv = ["--preset", "tiny", "--device", "cpu", "--compile", "--micro-batches", "4", "--lengths", "8", "16", "24"]
    result = projection.main([*argv, "--rounds", "1", "--out", str(tmp_path / "recipe.json")])
    rows = result["lavin"]["micro_batches"][4]
    assert set(rows["text"]) == set(rows["image"]) == {8, 16, 24} and result["compile_stats"]["graph_breaks"] == 0


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-3])
def test_training_loop_clips_the_gradients_norm_when_asked(monkeypatch, max_grad_norm):
    """`quality.train(max_grad_norm=…)` (`--max-grad-norm`): every optimizer step sees the trainable gradients'
    global norm at most that value, as the `Trainer` clips; 0 leaves them as backward made them."""
    from benchmarks import quality

    method, samples, collator = _tiny_method_on_captions("lavin")
    norms = []

    def recording_optimizer(*args, **kwargs):
        optimizer = create(*args, **kwargs)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = lambda: [p.grad for p in params if p.grad is not None]  # noqa: E731
        optimizer.register_step_pre_hook(lambda *_: norms.append(float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads()])))))  # fmt: skip
        return optimizer

    create = quality.create_mma_optimizer
    monkeypatch.setattr(quality, "create_mma_optimizer", recording_optimizer)
    quality.train(method, samples, collator, 3, 2, 1e-2, 0, dict, 3, max_grad_norm=max_grad_norm)
    assert len(norms) == 3
    if max_grad_norm:
        assert max(norms) <= max_grad_norm * (1 + 1e-5)
    else:
        assert min(norms) > 1e-2  # the unclipped gradients are far above the other case's bound
    with pytest.raises(SystemExit):  # the other experiments have no clipping
        quality.parse_args(["--experiment", "joint", "--max-grad-norm", "1"])
    with pytest.raises(SystemExit):
        quality.parse_args(["--experiment", "vqa", "--max-grad-norm", "-1"])
    assert quality.parse_args(["--experiment", "vqa", "--max-grad-norm", "1"]).max_grad_norm == 1.0
