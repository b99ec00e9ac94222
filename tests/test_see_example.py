"""`examples/see.py` (the README's main job) run small: its scoring, and the whole job on a tiny LLaMA."""

from __future__ import annotations

import pytest
import torch
from conftest import load_example, tiny_llama
from stand_in_tokenizer import word_tokenizer

from peft_mma import LaVINConfig, LlamaAdapterV2Config
from peft_mma.data.scenes import COLOURS, COUNTS, POSITIONS, QUESTIONS, SHAPES, WORDS

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
    # explanation-first answers ("EA"): the letter after the statement; an answer naming two letters names none
    assert see.letter_of("The shape is at the top left. The answer is B.") == "B"
    assert see.letter_of("The shape is red. The answer is A. The answer is C.") is None
    assert see.letter_of("The shape is red. The answer is A. The answer is A.") == "A"
    assert see.letter_of("The shape is red.") is None and see.letter_of("The answer is Blue.") is None


def test_configs_read_the_scene_encoder(see):
    lavin, v2 = (
        see.build_peft_config("lavin", "local-dir:/x", 30),
        see.build_peft_config("adapter-v2", "local-dir:/x", 30),
    )
    assert isinstance(lavin, LaVINConfig) and lavin.vision_feature_every == 1 and lavin.vision_pretrained
    # every decoder layer gets LaVIN's adapters by default, as in the official code; `lavin_from_layer` leaves some out
    assert see.LAVIN_FROM_LAYER == 0 and lavin.layers_to_transform is None
    assert see.build_peft_config("lavin", "local-dir:/x", 30, lavin_from_layer=1).layers_to_transform == list(
        range(1, 30)
    )
    assert see.build_peft_config("lavin", "local-dir:/x", 4, lavin_from_layer=3).layers_to_transform == [3]
    with pytest.raises(ValueError, match=r"lavin_from_layer.*\[0, 4\)"):
        see.build_peft_config("lavin", "local-dir:/x", 4, lavin_from_layer=4)
    wrongs = [["--lavin-from-layer", "-1"], ["--method", "adapter-v2", "--lavin-from-layer", "1"], ["--show", "-2"]]
    wrongs += [[flag, "0"] for flag in ("--steps", "--batch-size", "--train-size", "--eval-size")]
    for wrong in [*wrongs, ["--steps", "-1"], ["--questions"]]:
        with pytest.raises(SystemExit):
            see.parse_args(wrong)
    assert see.parse_args([]).lavin_from_layer == 0
    assert see.parse_args([]).answer_format == "EA" and see.parse_args(["--answer-format", "A"]).answer_format == "A"
    assert see.parse_args(["--bf16"]).steps == 240 and see.parse_args(["--no-bf16"]).steps == 180
    assert see.parse_args(["--bf16", "--steps", "7"]).steps == 7
    assert isinstance(v2, LlamaAdapterV2Config) and (v2.visual_width, v2.visual_depth) == (192, 2)
    assert v2.visual_fusion == "all"  # every prompted layer gets the visual tokens, as in the official code
    # the visual path alone (bridge, prompts, gates): no bias, scale or norm tuning
    assert (v2.bias_modules, v2.scale_modules, v2.norm_modules) == ([], [], [])
    assert lavin.vision_model == v2.vision_model == "local-dir:/x"


def _tokenizer():
    from peft_mma.data.templates import scienceqa_answer, scienceqa_prompt

    words = [*COLOURS, *SHAPES, *POSITIONS, "one", "two", "three", "four", *WORDS]
    texts = [scienceqa_prompt(q, words) for _, q in QUESTIONS.values()] + [scienceqa_answer(x) for x in "ABCD"]
    return word_tokenizer(texts=texts, words=words)


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu sse2 avx2 fma", False),
        ("fpu avx512f avx512_bf16 avx512_vnni", True),  # AMD Zen 4, Intel Cooper Lake on
        ("fpu avx512f amx_bf16 amx_tile", True),  # Intel Sapphire Rapids
    ],
)
def test_mixed_precision_by_default_where_the_cpu_computes_bf16(see, tmp_path, monkeypatch, flags, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert see.native_bf16(cpuinfo) is native
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")  # an Arm CPU with BF16
    assert see.native_bf16(cpuinfo)
    assert not see.native_bf16(tmp_path / "absent")  # no /proc/cpuinfo (macOS, Windows): fp32
    monkeypatch.setattr(see, "native_bf16", lambda: native)
    assert see.parse_args([]).bf16 is native
    assert see.parse_args(["--bf16"]).bf16 and not see.parse_args(["--no-bf16"]).bf16


@pytest.mark.parametrize(
    ("method", "precision"),
    [
        ("lavin", ["--no-bf16"]),
        ("lavin", ["--bf16"]),
        ("adapter-v2", ["--no-bf16"]),
        ("adapter-v2", ["--bf16"]),
        ("lavin", ["--bf16", "--answer-format", "A"]),
    ],
)
def test_job_trains_saves_reloads_bitwise_and_draws_answers(see, tmp_path, monkeypatch, method, precision):
    """The job end to end on a tiny LLaMA; with `--bf16` (the Trainer's mixed precision, which wraps the model's
    forward in autocast) the evaluation and the reload check run in fp32 again after training. By default the answers
    are explanation-first (the grid shows the statement under the letter); `--answer-format A` asks for the letter
    alone."""
    tokenizer = _tokenizer()
    explained = precision[-2:] != ["--answer-format", "A"]  # explanation-first by default
    args = see.parse_args(
        ["--method", method, "--steps", "4", "--batch-size", "4", "--train-size", "16", "--eval-size", "12"]
        + ["--show", "5", "--lr", "1e-2", "--output-dir", str(tmp_path / "out"), *precision]
    )
    datasets = []

    def scene_qa_dataset(*args, **kwargs):
        datasets.append(kwargs["explained"])
        return real_scene_qa_dataset(*args, **kwargs)

    real_scene_qa_dataset = see.scene_qa_dataset
    monkeypatch.setattr(see, "scene_qa_dataset", scene_qa_dataset)
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
    assert grid.size == (4 * 300, 2 * (192 + (94 if explained else 78)))  # 5 answers: 4 columns, 2 rows
    assert datasets == [explained, explained]  # the training and held-out questions, in the format asked for
    # the adapter moved: the saved weights differ from a fresh adapter's
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any(float(t.abs().max()) > 0 for t in saved.values())
    assert torch.isfinite(torch.stack([t.float().abs().max() for t in saved.values()])).all()


@pytest.mark.parametrize("method", ["lavin", "adapter-v2"])
def test_training_loss_from_the_response_logits_alone_is_the_models_own_loss(see, method):
    """The job asks the model for the logits of the last positions only, from the first that predicts a response
    token, and scores them with `response_loss`: the same loss and gradients as the model's own loss on every
    position, fewer positions through the LM head; a model that returns every position gives the same loss too."""
    from peft import get_peft_model

    from peft_mma.data.scenes import scene_qa_dataset

    tokenizer = _tokenizer()
    vision = dict(vision_model="vit_tiny_patch16_224", vision_pretrained=False, vision_model_kwargs=TINY_SCENE_VIT)
    if method == "lavin":
        config = LaVINConfig(**vision, vision_feature_every=1)
    else:
        config = LlamaAdapterV2Config(**vision, visual_width=16, visual_depth=1, visual_heads=2, prompt_length=3)
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256), config)
    for p in model.parameters():  # move the zero-initialised parts off their init so that every path has gradients
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    model.eval()  # no dropout: the passes below must see the same function
    samples = scene_qa_dataset(4, seed=0, image_size=64, questions=["colour", "word"])
    batch = see.collator_for(model, tokenizer, 64)(samples)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # right padding of unequal rows: the kept span covers the shortest's answer
    kept = see.keep_response_logits(batch)
    keep = len(kept["logits_to_keep"])
    assert keep < batch["input_ids"].shape[1] and torch.equal(kept["logits_to_keep"], torch.arange(-keep, 0))

    def loss_and_grads(loss_of):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    own, own_grads = loss_and_grads(lambda: model(**batch).loss)
    inputs = {k: v for k, v in kept.items() if k != "labels"}
    outputs = model(**inputs)
    assert outputs.logits.shape[1] == keep
    ours, our_grads = loss_and_grads(lambda: see.response_loss(model(**inputs), batch["labels"]))
    torch.testing.assert_close(ours, own, atol=1e-6, rtol=1e-5)
    for a, b in zip(our_grads, own_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    full = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(see.response_loss(model(**full), batch["labels"]), own, atol=1e-6, rtol=1e-5)
    count = int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(see.response_loss(outputs, batch["labels"], count * 2), own.detach() / 2)
    with pytest.raises(ValueError, match="no response tokens"):
        see.keep_response_logits(batch | {"labels": torch.full_like(batch["labels"], -100)})


@pytest.mark.parametrize("explained", [False, True])
def test_greedy_answers_have_room_for_the_statement_and_the_letter(see, explained):
    """`answer` decodes up to "The answer is X." and EOS, and with explanation-first samples up to the longest
    statement before it too; each row's answer is its new tokens alone, without the prompt or padding."""
    from peft_mma.data.scenes import scene_qa_dataset

    tokenizer = _tokenizer()
    samples = scene_qa_dataset(5, seed=0, image_size=64, questions=["colour", "position"], explained=explained)
    responses = [f"{s['explanation']} The answer is D." if explained else "The answer is D." for s in samples]
    longest = max(len(tokenizer(text)["input_ids"]) for text in responses)
    assert longest + 1 <= see.MAX_NEW_TOKENS["EA" if explained else "A"]
    calls = []

    class Model:  # records what the job asks `generate` for, answers "The answer is B." after the prompt
        peft_config = {"default": LlamaAdapterV2Config(vision_model="vit_tiny_patch16_224")}

        def eval(self):
            return self

        def generate(self, input_ids, max_new_tokens, **kwargs):
            calls.append(max_new_tokens)
            new = torch.tensor(tokenizer("The answer is B.")["input_ids"]).expand(len(input_ids), -1)
            return torch.cat([input_ids, new], 1)

    answers = see.answer(Model(), tokenizer, samples, 64)
    assert calls == [see.MAX_NEW_TOKENS["EA" if explained else "A"]]
    assert [see.letter_of(text) for text in answers] == ["B"] * 5 and answers[0].startswith("The answer")


def test_the_decoding_budget_covers_every_answer_in_smollm2_tokens(see, smollm2):
    """Every right answer of every question kind, with EOS, fits the job's `max_new_tokens` in SmolLM2's tokens (a
    statement cut short would leave its letter out, and the answer would count as wrong)."""
    from peft_mma.data.scenes import QUESTIONS, STATEMENTS
    from peft_mma.data.templates import scienceqa_answer

    _, tokenizer = smollm2
    values = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS, "count": COUNTS, "larger": COLOURS}
    values |= {"word": WORDS}
    assert set(values) == set(QUESTIONS) == set(STATEMENTS)
    for kind, statement in STATEMENTS.items():
        for value, letter in zip(values[kind], "ABCD"):
            for answer_format, text in [
                ("A", scienceqa_answer(letter)),
                ("EA", scienceqa_answer(letter, statement.format(value), explanation_first=True)),
            ]:
                tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # and EOS
                assert tokens <= see.MAX_NEW_TOKENS[answer_format], (answer_format, text, tokens)


@pytest.mark.parametrize(("method", "patch_heads"), [("lavin", False), ("adapter-v2", True)])
def test_main_gives_v2_the_patch_headed_encoder(see, monkeypatch, method, patch_heads):
    """`main` builds (or reads) the scene encoder of the job's seed: the class-token one for LaVIN, which reads class
    tokens, the patch-headed one for V2, whose bridge reads every token; `--encoder` overrides both."""
    import peft_mma.data.smollm2
    import peft_mma.vision.scene_encoder

    asked, configs = [], []
    monkeypatch.setattr(
        peft_mma.vision.scene_encoder,
        "scene_encoder",
        lambda seed, progress, patch_heads: asked.append((seed, patch_heads)) or f"local-dir:/enc{seed}{patch_heads}",
    )
    monkeypatch.setattr(peft_mma.data.smollm2, "load_smollm2", lambda dtype: (tiny_llama(), None))
    monkeypatch.setattr(see, "run", lambda base, tokenizer, config, args, size: configs.append(config) or {})
    see.main(["--method", method, "--seed", "3"])
    assert asked == [(3, patch_heads)] and configs[0].vision_model == f"local-dir:/enc3{patch_heads}"
    assert isinstance(configs[0], LaVINConfig if method == "lavin" else LlamaAdapterV2Config)
