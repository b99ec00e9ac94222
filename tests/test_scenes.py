"""Procedural scenes (`peft_mma.data.scenes`) and the encoder pretrained on them (`peft_mma.vision.scene_encoder`)."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter

import pytest
import torch

from peft_mma.data.collator import prompt_and_response
from peft_mma.data.scenes import (
    COLOURS,
    KINDS,
    QUESTIONS,
    SLOTS,
    WORDS,
    draw_scenes,
    random_scene,
    scene_dataset,
    scene_qa_dataset,
)
from peft_mma.data.templates import OPTION_LETTERS
from peft_mma.vision import scene_encoder as se


def test_scenes_are_seeded_and_splits_are_disjoint():
    a, b = scene_dataset(24, seed=3), scene_dataset(24, seed=3)
    assert all(torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"] for x, y in zip(a, b))
    assert not torch.equal(a[0]["image"], scene_dataset(24, seed=4)[0]["image"])
    train, held_out = scene_dataset(400, seed=0), scene_dataset(100, seed=0, split="eval")
    assert {s["scene"].split for s in train} == {"train"} and {s["scene"].split for s in held_out} == {"eval"}
    assert not {s["scene"].key for s in train} & {s["scene"].key for s in held_out}
    assert [s["kind"] for s in train[:8]] == [*KINDS, *KINDS]
    # the split is a hash of the content: about one scene in five is held out
    rng = random.Random(0)
    shares = Counter(random_scene(rng, KINDS[i % 4]).split for i in range(2000))
    assert 0.15 < shares["eval"] / 2000 < 0.25


def test_the_splits_share_no_drawn_image():
    """Disjoint keys are not enough where two keys can draw the same pixels: with float centres rounded for the
    key, a held-out object drew pixel for pixel what a training one did. Drawn with the same noise, no held-out
    scene's image equals a training scene's."""

    def images(split: str, n: int) -> set[bytes]:
        scenes = draw_scenes(random.Random(f"leak-{split}"), ["object", "count", "pair"], n, split, 64)
        return {scene.draw(torch.Generator().manual_seed(0)).numpy().tobytes() for scene in scenes}

    assert not images("train", 6000) & images("eval", 1500)


def test_a_scenes_split_does_not_depend_on_the_order_its_shapes_were_drawn_in():
    rng = random.Random(0)
    scene = next(s for s in (random_scene(rng, "count") for _ in range(100)) if len(s.shapes) > 1)
    swapped = dataclasses.replace(scene, shapes=list(reversed(scene.shapes)))
    assert swapped.key == scene.key and swapped.split == scene.split


def test_captions_and_slots_describe_the_scene():
    for sample in scene_dataset(40, seed=1):
        scene, attributes = sample["scene"], sample["attributes"]
        assert attributes["kind"] == sample["kind"] and set(attributes) <= set(SLOTS)
        assert all(attributes[slot] in SLOTS[slot] for slot in attributes)
        for value in attributes.values():
            if value != sample["kind"]:
                assert value in sample["caption"]
        if sample["kind"] == "count":
            assert len(scene.shapes) == ("one", "two", "three", "four").index(attributes["count"]) + 1
        if sample["kind"] == "pair":
            (_, large, large_half, *_), (_, small, small_half, *_) = scene.shapes
            assert (large, small) == (attributes["large_colour"], attributes["small_colour"]) and large != small
            assert large_half > 1.8 * small_half


def test_pixels_show_the_scene():
    """Each shape's centre pixel has its colour (at 80-100 % brightness); a word's pixels are light grey."""
    for sample in scene_dataset(40, seed=2):
        image, scene = sample["image"], sample["scene"]
        assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
        for shape, colour, _half, cx, cy in scene.shapes:
            y = int(cy + 0.35 * _half) if shape == "triangle" else int(cy)  # a triangle's centroid is below centre
            rgb, expected = image[:, y, int(cx)], torch.tensor(COLOURS[colour])
            assert torch.allclose(rgb / rgb.max(), expected / expected.max(), atol=0.02), (shape, colour)
        if scene.word is not None:
            assert int((image == 0.9).all(0).sum()) > 40  # the glyphs' pixels
        else:
            assert not (image == 0.9).all(0).any()


def test_questions_are_answered_by_the_scene_and_balanced():
    samples = scene_qa_dataset(240, seed=0)
    assert Counter(s["answer"] for s in samples) == dict.fromkeys("ABCD", 60)
    assert Counter(s["kind"] for s in samples) == dict.fromkeys(QUESTIONS, 40)
    for kind in QUESTIONS:  # each kind on its own too: no letter a blind guess per kind could lean on
        assert Counter(s["answer"] for s in samples if s["kind"] == kind) == dict.fromkeys("ABCD", 10), kind
    slot = {"colour": "colour", "shape": "shape", "position": "position", "count": "count", "larger": "large_colour"}
    for s in samples:
        scene_kind, question = QUESTIONS[s["kind"]]
        assert s["scene"].kind == scene_kind and s["question"] == question and len(s["options"]) == 4
        truth = s["scene"].attributes[slot.get(s["kind"], "word")]
        assert s["options"][OPTION_LETTERS.index(s["answer"])] == truth
        if s["kind"] == "word":
            assert set(s["options"]) <= set(WORDS) and len(set(s["options"])) == 4
    held_out = scene_qa_dataset(40, seed=0, split="eval")
    assert {s["scene"].split for s in held_out} == {"eval"}
    assert not {s["scene"].key for s in samples} & {s["scene"].key for s in held_out}


def test_explained_questions_state_the_scene_before_the_answer():
    """`explained=True` (ScienceQA's "EA" format) adds a statement of what the scene shows, read here from the scene's
    own attributes, and changes nothing else: same images, questions, options and answers."""
    plain = scene_qa_dataset(24, seed=3)
    explained = scene_qa_dataset(24, seed=3, explained=True)
    expected = {
        "colour": "The shape is {colour}.",
        "shape": "The shape is a {shape}.",
        "position": "The shape is at the {position}.",
        "count": "The number of shapes is {count}.",
        "larger": "The larger shape is {large_colour}.",
        "word": "The word is {word}.",
    }
    assert {s["kind"] for s in explained} == set(expected)
    for a, b in zip(plain, explained):
        assert torch.equal(a["image"], b["image"])
        assert {k: a[k] for k in ("question", "options", "answer", "kind")} == {
            k: b[k] for k in ("question", "options", "answer", "kind")
        }
        assert "explanation" not in a and b["explanation_first"] is True
        assert b["explanation"] == expected[b["kind"]].format(**b["scene"].attributes)
        assert prompt_and_response(b)[1] == f"{b['explanation']} The answer is {b['answer']}."


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="split"):
        scene_dataset(2, split="test")
    with pytest.raises(ValueError, match="multiple of 32"):
        scene_qa_dataset(2, image_size=28)
    with pytest.raises(ValueError, match="questions"):
        scene_qa_dataset(2, questions=["size"])
    with pytest.raises(ValueError, match="kinds"):
        scene_dataset(2, kinds=[])
    with pytest.raises(ValueError, match="steps"):
        se.pretrain(steps=0)


def test_linear_probe_fits_separable_features():
    torch.manual_seed(0)
    y = torch.randint(0, 4, (200,))
    x = torch.nn.functional.one_hot(y, 4).float() + 0.05 * torch.randn(200, 4)
    probe = se._fit_probe(x, y, 4)
    assert (probe(x).argmax(-1) == y).all()


def test_variance_share_is_the_spread_the_class_means_explain():
    x, y = torch.tensor([[0.0], [2.0], [1.0], [3.0]]), torch.tensor([0, 0, 1, 1])
    assert se.variance_share(x, y) == pytest.approx(0.2)  # means 1 and 2 around 1.5: 4 × 0.25 of a total 5
    assert se.variance_share(torch.tensor([[0.0], [0.0], [2.0], [2.0]]), y) == pytest.approx(1.0)
    assert se.variance_share(torch.tensor([[0.0], [2.0], [2.0], [0.0]]), y) == pytest.approx(0.0)


def test_slot_probe_finds_position_in_the_quadrants_mean_colours():
    """Each quadrant's mean colour says where the shape is: held out, the position probe is right, and position is
    the slot that explains most of those features' spread."""
    probed = se.slot_probe(
        lambda images: torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1), train_size=256, eval_size=128
    )
    assert set(probed) == set(SLOTS)
    assert probed["position"]["accuracy"] >= 0.95
    shares = {slot: result["variance_share"] for slot, result in probed.items()}
    assert max(shares, key=shares.get) == "position" and 0 < shares["position"] < 1


def test_pretraining_reads_the_class_token_and_the_mean_of_the_patch_tokens():
    """Slot heads can read two things after the final norm: the class token (LaVIN's reading) and the mean of the
    patch tokens (what V2's bridge starts out reading); the loss is every slot's cross-entropy from each reading the
    heads have, scenes without the slot left out."""
    torch.manual_seed(0)
    model = se._create(0)
    images = torch.rand(3, 3, se.IMAGE_SIZE, se.IMAGE_SIZE)
    read = se.readings(model, images)
    tokens = model.forward_features(images)  # (3, 1 + 16, C)
    assert set(read) == set(se.READINGS) == {"class", "patches"}
    torch.testing.assert_close(read["class"], tokens[:, 0], atol=0, rtol=0)
    torch.testing.assert_close(read["patches"], tokens[:, 1:].mean(1), atol=1e-6, rtol=0)
    width = model.num_features
    heads = torch.nn.ModuleDict(
        {r: torch.nn.ModuleDict({s: torch.nn.Linear(width, len(v)) for s, v in SLOTS.items()}) for r in se.READINGS}
    )
    targets = {slot: torch.tensor([0, se.IGNORE, len(values) - 1]) for slot, values in SLOTS.items()}
    kept = torch.tensor([0, 2])
    expected = sum(
        torch.nn.functional.cross_entropy(heads[r][slot](read[r])[kept], targets[slot][kept])
        for slot in SLOTS
        for r in ("class", "patches")
    )
    torch.testing.assert_close(se.slot_loss(read, heads, targets), expected)
    # the default encoder's heads read the class token alone; `patch_heads=True` is cached in a folder of its own
    class_only = torch.nn.ModuleDict({"class": heads["class"]})
    alone = sum(
        torch.nn.functional.cross_entropy(heads["class"][s](read["class"])[kept], targets[s][kept]) for s in SLOTS
    )
    torch.testing.assert_close(se.slot_loss(read, class_only, targets), alone)
    assert se.scene_encoder_dir(patch_heads=True).name == se.scene_encoder_dir().name.replace("-seed", "-patches-seed")


def test_a_steps_shards_add_up_to_its_batch():
    """The shards' losses, each over the whole batch's count of scenes with the slot, sum to the batch's loss, and
    their gradients to its gradients; a slot that no scene has adds nothing (no NaN)."""
    torch.manual_seed(0)
    model = se._create(0)
    heads = torch.nn.ModuleDict(
        {"class": torch.nn.ModuleDict({s: torch.nn.Linear(128, len(v)) for s, v in SLOTS.items()})}
    )
    params = [*model.parameters(), *heads.parameters()]
    scenes = scene_dataset(6, seed=0)
    images, targets = torch.stack([s["image"] for s in scenes]), se._targets([s["scene"] for s in scenes])
    targets["word"] = torch.full((6,), se.IGNORE)  # nobody has it here
    counts = se.slot_counts(targets)
    assert counts["word"] == 0 and 0 < counts["count"] < 6  # some slots on only some scenes
    whole = se.slot_loss(se.readings(model, images), heads, targets)
    assert torch.isfinite(whole)
    grads = torch.autograd.grad(whole, params)
    parts = [
        se._shard_gradients(
            model, heads, params, images[i : i + 3], {k: t[i : i + 3] for k, t in targets.items()}, counts
        )
        for i in (0, 3)
    ]
    assert sum(loss for loss, _ in parts) == pytest.approx(float(whole), rel=1e-6)
    for g, a, b in zip(grads, parts[0][1], parts[1][1]):
        torch.testing.assert_close(a + b, g, atol=1e-6, rtol=1e-5)


def test_sharded_pretraining_is_the_same_on_threads_as_one_after_the_other(monkeypatch):
    """The shards run at once on threads of a pool, each on `BUILD_THREADS` torch threads; the result is bitwise
    that of running them in turn on the caller's thread, so the weights do not depend on how many cores there are."""
    import threading

    shard_gradients, seen = se._shard_gradients, []

    def recording(*args, **kwargs):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return shard_gradients(*args, **kwargs)

    class InTurn:
        def __init__(self, max_workers):
            assert max_workers == se.SHARDS

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, fn, *iterables):
            return [fn(*items) for items in zip(*iterables)]

    monkeypatch.setattr(se, "_shard_gradients", recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(se.BUILD_THREADS)
    try:
        on_threads, report = se.pretrain(seed=2, steps=3, batch_size=8)
        assert len(seen) == 3 * se.SHARDS and threading.get_ident() not in {ident for ident, _ in seen}
        assert {count for _, count in seen} == {se.BUILD_THREADS}
        monkeypatch.setattr(se, "ThreadPoolExecutor", InTurn)
        in_turn, _ = se.pretrain(seed=2, steps=3, batch_size=8)
    finally:
        torch.set_num_threads(threads)
    assert report["shards"] == se.SHARDS == 2 and {ident for ident, _ in seen[6:]} == {threading.get_ident()}
    for (name, a), b in zip(on_threads.state_dict().items(), in_turn.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(on_threads.pos_embed, se._create(2).pos_embed)
    # a batch smaller than the shards leaves a shard empty, which adds nothing
    single, report = se.pretrain(seed=2, steps=1, batch_size=1)
    assert all(torch.isfinite(p).all() for p in single.parameters()) and report["final_loss"] > 0


def test_scene_encoder_builds_on_its_own_thread_count_and_gives_the_callers_back(tmp_path, monkeypatch):
    """Pretraining and the probe run on `BUILD_THREADS` torch threads whatever the caller set (the weights depend on
    the thread count, and the folder's name promises one encoder), and the caller's count is restored, also when
    the build fails."""
    seen = []

    def pretrain(**kwargs):
        seen.append(torch.get_num_threads())
        return se._create(0), {}

    monkeypatch.setattr(se, "pretrain", pretrain)
    monkeypatch.setattr(se, "linear_probe", lambda model, seed=0: seen.append(torch.get_num_threads()) or {})
    threads = torch.get_num_threads()
    torch.set_num_threads(se.BUILD_THREADS + 1)
    try:
        se.build_scene_encoder(tmp_path / "encoder", steps=1)
        assert seen == [se.BUILD_THREADS] * 2 and torch.get_num_threads() == se.BUILD_THREADS + 1
        monkeypatch.setattr(se, "linear_probe", lambda model, seed=0: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            se.build_scene_encoder(tmp_path / "failed", steps=1)
        assert torch.get_num_threads() == se.BUILD_THREADS + 1 and not (tmp_path / "failed").exists()
    finally:
        torch.set_num_threads(threads)


def test_scene_encoder_is_built_once_cached_and_loads_as_a_timm_encoder(tmp_path, monkeypatch):
    """A short build (3 steps) lands in the cache as a timm folder; the second call reuses it; both methods load it
    by name with `vision_pretrained=True` and see exactly the saved weights, and an adapter on it reloads."""
    from peft import PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_mma import LaVINConfig, LlamaAdapterV2Config
    from peft_mma.vision.backbone import VisionBackbone

    monkeypatch.setenv("PEFT_MMA_CACHE", str(tmp_path))
    monkeypatch.setattr(se, "BATCH_SIZE", 8)
    monkeypatch.setattr(se, "linear_probe", lambda model, seed=0: {"colour": 0.5})
    name = se.scene_encoder(seed=1, steps=3)
    folder = se.scene_encoder_dir(seed=1, steps=3)
    assert name == f"local-dir:{folder}" and folder.parent == tmp_path
    report = json.loads((folder / "report.json").read_text())
    assert report["steps"] == 3 and report["linear_probe"] == {"colour": 0.5}
    monkeypatch.setattr(se, "build_scene_encoder", lambda *a, **k: pytest.fail("rebuilt a cached encoder"))
    assert se.scene_encoder(seed=1, steps=3) == name

    loaded = VisionBackbone(name, pretrained=True).encoder
    fresh = se._create(1)  # the untrained initialisation: pretraining moved every block
    assert not torch.equal(loaded.blocks[0].attn.qkv.weight, fresh.blocks[0].attn.qkv.weight)
    assert tuple(loaded.pretrained_cfg["mean"]) == (0.0, 0.0, 0.0) and len(loaded.blocks) == se.MODEL_ARGS["depth"]

    llama = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    images = torch.stack([s["image"] for s in scene_dataset(2, seed=0)])
    for config in (
        LaVINConfig(vision_model=name, vision_pretrained=True, vision_feature_every=1),
        LlamaAdapterV2Config(vision_model=name, vision_pretrained=True, visual_width=32, visual_depth=1),
    ):
        torch.manual_seed(0)
        model = get_peft_model(LlamaForCausalLM(llama), config)
        backbone = next(m for m in model.modules() if isinstance(m, VisionBackbone))
        assert torch.equal(backbone.encoder.pos_embed, loaded.pos_embed)  # the saved weights, not a random draw
        model.save_pretrained(tmp_path / type(config).__name__)
        reloaded = PeftModel.from_pretrained(LlamaForCausalLM(llama), tmp_path / type(config).__name__)
        assert reloaded.peft_config["default"].vision_model == name
        again = next(m for m in reloaded.modules() if isinstance(m, VisionBackbone))
        assert torch.equal(again.encoder.pos_embed, loaded.pos_embed)
        assert backbone.check_pixel_values(images) is None

    # PIL images through the collator's timm transform: the encoder's own data config, the scene tensors as they are
    from PIL import Image

    from peft_mma.data.collator import timm_image_transform

    transform, size = timm_image_transform(name)
    pixels = (images[0] * 255).round().byte()
    assert size == 64
    torch.testing.assert_close(transform(Image.fromarray(pixels.permute(1, 2, 0).numpy())), pixels.float() / 255)


def test_an_incomplete_cache_folder_is_built_again(tmp_path, monkeypatch):
    """A folder cut short (weights missing, or truncated) is set aside and built again, not loaded or left to make
    every later build fail; `PEFT_MMA_CACHE` is made absolute, `~` expanded, since adapter configs name its folders."""
    from peft_mma.data.cache import cache_root

    monkeypatch.setenv("PEFT_MMA_CACHE", "~/somewhere")
    assert cache_root() == cache_root().expanduser().resolve() and "~" not in str(cache_root())
    monkeypatch.setenv("PEFT_MMA_CACHE", str(tmp_path))
    monkeypatch.setattr(se, "BATCH_SIZE", 8)
    monkeypatch.setattr(se, "linear_probe", lambda model, seed=0: {"colour": 0.5})
    folder = se.scene_encoder_dir(seed=1, steps=2)
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # no weights
    se.scene_encoder(seed=1, steps=2)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # truncated
    se.scene_encoder(seed=1, steps=2)
    assert (folder / "model.safetensors").read_bytes() == weights  # the same seeded build
    (folder / "config.json").write_text("{")  # damaged
    se.scene_encoder(seed=1, steps=2)
    assert json.loads((folder / "config.json").read_text()) and (folder / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # nothing staged or stale is left
