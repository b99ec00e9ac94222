"""`examples/see.py` (the README's main job) run small: its scoring, and the whole job on a tiny LLaMA."""

from __future__ import annotations

import pytest
import torch
from conftest import load_example, tiny_llama
from stand_in_tokenizer import word_tokenizer

from peft_mma import LaVINConfig, LlamaAdapterV2Config
from peft_mma.data.scenes import COLOURS, POSITIONS, QUESTIONS, SHAPES, WORDS

TINY_SCENE_VIT = dict(img_size=64, patch_size=16, depth=2, embed_dim=32, num_heads=4, num_classes=0)


@pytest.fixture(scope="module")
def see():
    return load_example("see")


def test_answers_are_scored_by_their_letter(see):
    assert see.letter_of("The answer is B.") == "B" and see.letter_of("The answer is D") == "D"
    assert see.letter_of("B") is None and see.letter_of("The answer is E.") is None and see.letter_of("") is None
    samples = [{"answer": "A", "kind": "colour"}, {"answer": "B", "kind": "colour"}, {"answer": "C", "kind": "word"}]
    answers = ["The answer is A.", "The answer is C.", "The answer is C. BECAUSE"]
    assert see.accuracy(samples, answers) == {"all": 2 / 3, "colour": 0.5, "word": 1.0}


def test_configs_read_the_scene_encoder(see):
    lavin, v2 = see.build_peft_config("lavin", "local-dir:/x"), see.build_peft_config("adapter-v2", "local-dir:/x")
    assert isinstance(lavin, LaVINConfig) and lavin.vision_feature_every == 1 and lavin.vision_pretrained
    assert isinstance(v2, LlamaAdapterV2Config) and (v2.visual_width, v2.visual_depth) == (192, 2)
    assert v2.visual_fusion == "all"  # every prompted layer gets the visual tokens, as in the official code
    assert lavin.vision_model == v2.vision_model == "local-dir:/x"


def _tokenizer():
    from peft_mma.data.templates import scienceqa_answer, scienceqa_prompt

    words = [*COLOURS, *SHAPES, *POSITIONS, "one", "two", "three", "four", *WORDS]
    texts = [scienceqa_prompt(q, words) for _, q in QUESTIONS.values()] + [scienceqa_answer(x) for x in "ABCD"]
    return word_tokenizer(texts=texts, words=words)


@pytest.mark.parametrize("method", ["lavin", "adapter-v2"])
def test_job_trains_saves_reloads_bitwise_and_draws_answers(see, tmp_path, method):
    tokenizer = _tokenizer()
    args = see.parse_args(
        ["--method", method, "--steps", "4", "--batch-size", "4", "--train-size", "16", "--eval-size", "12"]
        + ["--show", "5", "--lr", "1e-2", "--output-dir", str(tmp_path / "out")]
    )
    vision = dict(vision_model="vit_tiny_patch16_224", vision_pretrained=False, vision_model_kwargs=TINY_SCENE_VIT)
    if method == "lavin":
        config = LaVINConfig(**vision, vision_feature_every=1)
    else:
        config = LlamaAdapterV2Config(**vision, visual_width=16, visual_depth=1, visual_heads=2, prompt_length=3)
    base = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    result = see.run(base, tokenizer, config, args, image_size=64)

    assert result["reload_max_diff"] == 0.0
    for accuracy in (result["accuracy_before"], result["accuracy_after"]):
        assert set(accuracy) == {"all", *see.DEFAULT_QUESTIONS} and 0 <= accuracy["all"] <= 1
    assert len(result["shown_answers"]) == 5 and len(result["train_logs"]) > 0
    assert (tmp_path / "out" / "adapter_config.json").exists()
    from PIL import Image

    grid = Image.open(tmp_path / "out" / "answers.png")
    assert grid.size == (4 * 300, 2 * (192 + 78))  # 5 answers: 4 columns, 2 rows
    # the adapter moved: the saved weights differ from a fresh adapter's
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any(float(t.abs().max()) > 0 for t in saved.values())
    assert torch.isfinite(torch.stack([t.float().abs().max() for t in saved.values()])).all()
