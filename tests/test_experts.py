"""Expert models as context (`peft_mma.data.experts`): the hook that puts an expert's reading of each image into the
prompt, and the Tesseract OCR expert on the scenes' printed words."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from peft_mma.data.collator import prompt_and_response
from peft_mma.data.experts import TesseractOCR, with_experts
from peft_mma.data.scenes import scene_qa_dataset

needs_tesseract = pytest.mark.skipif(
    not TesseractOCR.available(),
    reason="the `tesseract` program is not installed (Debian: apt-get install tesseract-ocr)",
)


def question(**extra) -> dict:
    return {
        "image": torch.zeros(3, 8, 8),
        "question": "Which word?",
        "options": ["CAT", "DOG"],
        "answer": "A",
        **extra,
    }


def test_expert_outputs_enter_the_prompt_as_context_ahead_of_the_samples_own():
    said = {"OCR": lambda image: "CAT", "Caption": lambda image: f"a {image.shape[-1]} px picture"}
    instruction = {"image": torch.zeros(3, 8, 8), "instruction": "Read it.", "input": "Be brief.", "output": "CAT"}
    text_only = {"instruction": "Say hi.", "output": "hi"}
    no_image = question(image=None)  # HF ScienceQA's text-only questions: no expert runs, nothing is added
    samples = [question(), question(context="A sign."), instruction, text_only, no_image]
    kept = copy.deepcopy(samples)
    out = with_experts(samples, said)  # the Caption expert would fail on None: it must not run there
    assert out[4] == no_image and prompt_and_response(out[4]) == prompt_and_response(no_image)
    out = out[:4]
    prompts = [prompt_and_response(s)[0] for s in out]
    assert "Context: OCR: CAT\nCaption: a 8 px picture\nOptions:" in prompts[0]
    assert "Context: OCR: CAT\nCaption: a 8 px picture\n\nA sign.\nOptions:" in prompts[1]
    assert "### Input:\nOCR: CAT\nCaption: a 8 px picture\n\nBe brief.\n\n### Response:" in prompts[2]
    assert out[3] == text_only and prompt_and_response(out[3]) == prompt_and_response(text_only)
    assert [s.keys() for s in samples] == [s.keys() for s in kept]  # the inputs are not changed
    samples = samples[:4]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(out[:3], samples[:3]))


def test_a_sample_with_an_instruction_and_a_question_gets_the_context_the_collator_reads():
    """`prompt_and_response` picks the Alpaca template when a sample has `instruction`, which reads `input`: the
    experts' text goes there, not into a `context` that template never reads."""
    sample = {**question(), "instruction": "Read it."}
    out = with_experts([sample], {"OCR": lambda image: "CAT"})
    assert "### Input:\nOCR: CAT\n\n### Response:" in prompt_and_response(out[0])[0]


@needs_tesseract
def test_tesseract_refuses_an_image_outside_zero_to_one():
    """An 8-bit tensor (`torchvision.io.read_image`'s) or a normalised one would read as a blank page."""
    scene = scene_qa_dataset(1, split="eval", questions=["word"])[0]["image"]
    for image, dtype in (((scene * 255).round().byte(), "torch.uint8"), (scene * 2 - 1, "torch.float32")):
        with pytest.raises(ValueError, match=f"float tensors in \\[0, 1\\] .*; got {dtype} values"):
            TesseractOCR()(image)


def test_an_expert_that_reads_nothing_leaves_the_prompt_as_it_was():
    out = with_experts([question()], {"OCR": lambda image: "  "})
    assert prompt_and_response(out[0]) == prompt_and_response(question())


@pytest.mark.parametrize(
    ("experts", "samples", "error", "match"),
    [
        ({}, [question()], ValueError, "non-empty mapping"),
        (["OCR"], [question()], ValueError, "non-empty mapping"),
        ({"OCR": "CAT"}, [question()], TypeError, r"\['OCR'\] are not callable"),
        ({"OCR": lambda image: None}, [question()], TypeError, "returned NoneType, expected a string"),
        ({"OCR": lambda image: "x"}, [{"image": torch.zeros(3, 2, 2), "prompt": "p"}], ValueError, "no context slot"),
        ({"OCR": lambda image: "x"}, [{**question(), "prompt": "p"}], ValueError, "no ready `prompt`"),
    ],
)
def test_bad_experts_and_samples_get_clear_errors(experts, samples, error, match):
    with pytest.raises(error, match=match):
        with_experts(samples, experts)


def test_samples_are_checked_before_any_expert_runs():
    calls = []
    bad = {"image": torch.zeros(3, 2, 2), "prompt": "p"}
    with pytest.raises(ValueError, match="Sample 1 has an image but its prompt has no context slot"):
        with_experts([question(), bad], {"OCR": lambda image: calls.append(image) or "x"})
    assert calls == []


def test_a_missing_tesseract_says_how_to_install_it():
    with pytest.raises(FileNotFoundError, match="apt-get install tesseract-ocr"):
        TesseractOCR(executable="no-such-tesseract-program")


@needs_tesseract
def test_tesseract_reads_the_printed_words_of_held_out_scenes():
    samples = scene_qa_dataset(24, seed=1, split="eval", questions=["word"])
    ocr = TesseractOCR()
    read = [ocr(s["image"]) for s in samples]
    exact = sum(text.upper() == s["scene"].attributes["word"] for text, s in zip(read, samples)) / len(samples)
    assert exact >= 0.6, read  # 18 of these 24 with Debian 12's Tesseract 5.3.0; 71 % of 96 in benchmarks.quality
    assert ocr(Image.fromarray((samples[0]["image"].mean(0) * 255).byte().numpy())) == read[0]  # a PIL image alike
    out = with_experts(samples[:1], {"OCR": ocr})
    assert out[0]["context"] == f"OCR: {read[0]}"


@needs_tesseract
def test_tesseract_refuses_what_is_not_an_image():
    with pytest.raises(TypeError, match=r"\(3, H, W\) or \(H, W\) tensor"):
        TesseractOCR()(torch.zeros(1, 3, 8, 8))
