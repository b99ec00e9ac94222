"""Expert models as context (LLaMA-Adapter V2's expert models; spec `llama_adapter_v2.md` §6, paper §4.3).

An expert reads a sample's image and says what it sees as text (a caption, the text written in it); that text
enters the prompt as context, and nothing in the tuner changes:

    prompt = template(question, context = "OCR: SALE\\nCaption: a shop window", options)

An expert is any callable `image → str`, where the image is what the sample holds (a (3, H, W) float tensor in
[0, 1], or a PIL image). `with_experts(samples, {"OCR": TesseractOCR()})` returns the samples with their experts'
outputs as context, for training and for inference alike; plug in your own expert the same way:

    samples = with_experts(samples, {"OCR": TesseractOCR(), "Caption": my_captioner})

`TesseractOCR` runs the Tesseract command-line program (Debian/Ubuntu: `apt-get install tesseract-ocr`).
"""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from PIL import Image, ImageOps, ImageStat

from .templates import context_with_experts

Expert = Callable[[Any], str]


def _grey(image: Any) -> Image.Image:
    """An 8-bit greyscale PIL image of a (3, H, W) / (H, W) tensor in [0, 1] or a PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("L")
    if isinstance(image, torch.Tensor) and image.ndim in (2, 3):
        if not image.is_floating_point() or bool(image.min() < 0) or bool(image.max() > 1):
            raise ValueError(
                f"An expert reads images as float tensors in [0, 1] (before any normalisation); got {image.dtype} "
                f"values in [{image.min().item()}, {image.max().item()}]. Divide 8-bit images by 255."
            )
        grey = image.detach().float().cpu()
        grey = grey.mean(0) if grey.ndim == 3 else grey  # (H, W)
        return Image.fromarray((grey.clamp(0, 1) * 255).round().byte().numpy())
    raise TypeError(f"An expert reads a (3, H, W) or (H, W) tensor in [0, 1] or a PIL image, got {type(image)}.")


class TesseractOCR:
    """Text written in an image, read by Tesseract: `TesseractOCR()(image)` → e.g. "SALE" ("" when none is read).

    Tesseract reads dark text on a light page at about 30 px a line or more, so the image is turned to greyscale,
    inverted when its background is dark, enlarged to at least `min_height` pixels and framed by a white margin.
    `page_mode` is Tesseract's `--psm` (7: one line of text).
    """

    def __init__(
        self, executable: str = "tesseract", page_mode: int = 7, min_height: int = 192, language: str = "eng"
    ) -> None:
        path = shutil.which(executable)
        if path is None:
            raise FileNotFoundError(
                f"The Tesseract program `{executable}` is not installed: install it (Debian/Ubuntu: "
                "`apt-get install tesseract-ocr`) or pass its path as `executable`."
            )
        self.command = [path, "stdin", "stdout", "--psm", str(page_mode), "-l", language]
        self.min_height = min_height

    @staticmethod
    def available(executable: str = "tesseract") -> bool:
        return shutil.which(executable) is not None

    def page(self, image: Any) -> Image.Image:
        """The greyscale page Tesseract reads (dark text on white)."""
        grey = _grey(image)
        if ImageStat.Stat(grey).median[0] < 128:  # a dark background: light text
            grey = ImageOps.invert(grey)
        scale = max(1, -(-self.min_height // grey.height))  # ceil
        grey = grey.resize((grey.width * scale, grey.height * scale), Image.Resampling.BICUBIC)
        return ImageOps.expand(grey, border=16, fill=255)

    def __call__(self, image: Any) -> str:
        buffer = io.BytesIO()
        self.page(image).save(buffer, format="PNG")
        done = subprocess.run(self.command, input=buffer.getvalue(), capture_output=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"Tesseract failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
        return " ".join(done.stdout.decode(errors="replace").split())


def with_experts(samples: Iterable[dict], experts: Mapping[str, Expert]) -> list[dict]:
    """Copies of `samples` with the outputs of `experts` ({name: expert}) on each sample's `image` as context: the
    `context` of a question sample (LaVIN's ScienceQA format), the `input` of an instruction sample (the Alpaca
    template; an instruction sample's when it has both, as `collator.prompt_and_response` picks the Alpaca template),
    ahead of any context the sample already has; one `Name: text` line per expert
    (`templates.expert_context`). Samples without an image (no `image`, or `image` None, as the collator reads it)
    are copied unchanged."""
    if not isinstance(experts, Mapping) or not experts:
        raise ValueError(f"`experts` must be a non-empty mapping of name → callable(image) → str, got {experts!r}.")
    not_callable = [name for name, expert in experts.items() if not callable(expert)]
    if not_callable:
        raise TypeError(f"Experts {not_callable} are not callable; each must map an image to a string.")
    samples = list(samples)
    for i, sample in enumerate(samples):
        has_slot = ("question" in sample or "instruction" in sample) and "prompt" not in sample
        if sample.get("image") is not None and not has_slot:
            raise ValueError(
                f"Sample {i} has an image but its prompt has no context slot for expert outputs: it needs "
                f"`question` or `instruction`, and no ready `prompt`, which the collator would use as it is (keys: "
                f"{sorted(sample)})."
            )
    out = []
    for sample in samples:
        if sample.get("image") is None:
            out.append(dict(sample))
            continue
        said = {name: expert(sample["image"]) for name, expert in experts.items()}
        for name, text in said.items():
            if not isinstance(text, str):
                raise TypeError(f"Expert {name!r} returned {type(text).__name__}, expected a string.")
        slot = "input" if "instruction" in sample else "context"  # the template the collator picks reads it
        out.append({**sample, slot: context_with_experts(said, sample.get(slot))})
    return out
