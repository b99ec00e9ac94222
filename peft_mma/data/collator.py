"""Collator for causal-LM fine-tuning on prompt/response pairs, with optional images.

Each sample becomes `[BOS] + prompt + response + [EOS]`, where BOS is added only if the tokenizer adds one
itself (`add_bos_token`, or what it does to a plain string). The response continues the prompt's text, as both
official code bases (and TRL's prompt-completion datasets) have it: `prompt + response` is tokenised as one string,
and as many tokens as the prompt alone has are the prompt's, so any separator belongs in the response or the
template (the Alpaca and ScienceQA templates end in "Response:", LLaMA-2's chat turn wants " " + the answer).
Tokenised alone, a response would get a SentencePiece tokenizer's `▁` prefix. Labels are the input ids with -100
on the BOS, the prompt and the padding, so the loss covers the response and its EOS only (the official code uses 0
as the ignore index, spec/llama_adapter_v2.md §4 and spec/lavin_mma.md §4; PyTorch's default -100 is used here).

Images: a batch whose samples carry an `"image"` gets `pixel_values` (B, 3, S, S) and `has_image` (B,), and
text-only samples get a zero image there, as both official code bases feed them (spec/llama_adapter_v2.md §3.7,
spec/lavin_mma.md §4). Tensors are used as they are; PIL images go through the timm eval transform of
`image_model` (`timm.data.resolve_data_config` + `create_transform`) or through `image_transform`. For LaVIN, pass
`image_tokens` (`ImageTokens.from_config(model.peft_config[name])`): each sample with an image then gets its n
placeholder ids, where its prompt says `<image>` or else right after BOS (`data.image_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from .image_tokens import IMAGE_MARKER, ImageTokens
from .templates import format_prompt, scienceqa_answer, scienceqa_prompt

IGNORE_INDEX = -100


def response_keep_length(labels: torch.Tensor) -> int:
    """How many last positions the LM head must see for the loss on `labels` (B, T): from just before the earliest
    supervised token to the end, at most T (pass it as `logits_to_keep`, by index: `torch.arange(-keep, 0)`). A
    label at position 0 has no position before it: nothing predicts it, as in transformers' own shifted loss."""
    supervised = labels != IGNORE_INDEX
    supervised[:, 0] = False  # no position predicts it
    first = torch.where(supervised.any(1), supervised.float().argmax(1), labels.shape[1] - 1)
    return int(labels.shape[1] - first.min()) + 1


def response_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of the last K = `logits.shape[1]` positions (B, K, V) against the labels (B, T) that
    follow them: logit t predicts label t + 1, the ignored labels left out (K = T: the usual shifted loss)."""
    targets = labels[:, labels.shape[1] - logits.shape[1] + 1 :]  # (B, K - 1)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def grouping_lengths(lengths: Sequence[int], has_image: Sequence[bool]) -> list[int]:
    """Keys for transformers' `LengthGroupedSampler` (the `Trainer`'s `group_by_length`) that make its batches
    hold one modality each and samples of similar length: a text-only sample's key is its length, a sample with an
    image its length plus the longest length + 1.

    The sampler sorts every mega-batch of 50 batches by key, so the image samples come first, longest first, then
    the text-only ones; at most one batch per mega-batch holds both. A batch without images then needs no vision
    encoder (a batch holding one image runs it on every row), and one of similar lengths little padding
    (`benchmarks.projection`: the LaVIN-7B ScienceQA recipe, shuffled and grouped).

    Args:
        lengths: each sample's token count (with its image placeholders, as `CausalLMCollator.encode` gives it).
        has_image: whether each sample has an image.
    """
    if len(lengths) != len(has_image):
        raise ValueError(f"Got {len(lengths)} lengths and {len(has_image)} image flags; give one of each per sample.")
    offset = max(lengths, default=0) + 1
    return [int(length) + (offset if image else 0) for length, image in zip(lengths, has_image)]


def prompt_and_response(sample: dict[str, Any]) -> tuple[str, str]:
    """The (prompt, response) texts of a sample, chosen by its keys.

    - `prompt` (+ optional `response`): used as they are;
    - `instruction`, `input`, `output`: the Alpaca template (`templates.format_prompt`);
    - `question`, `options`, `answer` (+ optional `context`, `explanation`, and `explanation_first` to put the
      explanation before the answer): LaVIN's ScienceQA format (`templates.scienceqa_answer`).
    """
    if "prompt" in sample:
        return sample["prompt"], sample.get("response", "")
    if "instruction" in sample:
        return format_prompt(sample["instruction"], sample.get("input")), sample.get("output", "")
    if "question" in sample:
        prompt = scienceqa_prompt(sample["question"], sample["options"], sample.get("context"))
        answer = sample.get("answer")
        if answer is None:
            return prompt, ""
        return prompt, scienceqa_answer(answer, sample.get("explanation"), sample.get("explanation_first", False))
    hint = ""
    if not sample:  # what the HF `Trainer` hands on after dropping the columns its model's forward does not name
        hint = " With the HF `Trainer`, pass `TrainingArguments(remove_unused_columns=False)` to keep them."
    raise ValueError(
        f"A sample needs `prompt`, `instruction` or `question` keys (or pass `prompt_fn`), got keys {sorted(sample)}."
        + hint
    )


def timm_image_transform(model_name: str) -> tuple[Callable, int]:
    """(eval transform, image size) for timm model `model_name`, from its pretrained config; nothing is downloaded."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(model_name)
    if pretrained_cfg is not None:
        config = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict())
    else:
        with torch.device("meta"):
            config = resolve_data_config(model=timm.create_model(model_name, pretrained=False))
    return create_transform(**config), config["input_size"][-1]


def lavin_image_transform(size: int = 224) -> Callable:
    """LaVIN's official preprocessing (spec `lavin_mma.md` §4): squash-resize to size × size (bicubic, no crop),
    then ImageNet's mean and std, not CLIP's. Pass it as `CausalLMCollator(image_transform=...)`; `image_model`
    gives the encoder's own (CLIP's) transform, which LLaMA-Adapter V2 uses at inference."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

    return create_transform(
        input_size=(3, size, size),
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        crop_pct=1.0,
        crop_mode="squash",
    )


class CausalLMCollator:
    """Tokenise, mask, truncate and pad a list of samples into a causal-LM batch.

    Args:
        tokenizer: any Hugging Face tokenizer; its `pad_token_id` (else `eos_token_id`) pads.
        max_length: sequences are cut to this many tokens from the right, before padding.
        padding_side: "right" for training, "left" for generation.
        with_response: False gives prompts only (BOS + prompt, no EOS, no `labels`), for `generate`.
        prompt_fn: sample → (prompt, response); defaults to `prompt_and_response`.
        image_model: timm model name whose eval transform is applied to PIL images.
        image_transform: callable applied to PIL images instead (overrides `image_model`'s transform).
        image_size: S of the zero image of text-only samples; when set (or with `image_model`) every batch
            carries `pixel_values` and `has_image`, else only batches with at least one image do. With
            `image_tokens` (LaVIN) a batch without images carries neither: LaVIN reads no image of a text-only
            sample, so its encoder need not run for such a batch (V2 reads the zero image, as the official code).
        image_tokens: LaVIN's image placeholders, put into the ids of every sample with an image.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 512,
        padding_side: str = "right",
        with_response: bool = True,
        prompt_fn: Callable[[dict[str, Any]], tuple[str, str]] | None = None,
        image_model: str | None = None,
        image_transform: Callable | None = None,
        image_size: int | None = None,
        image_tokens: ImageTokens | None = None,
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
        if max_length < 1:
            raise ValueError(f"`max_length` must be at least 1, got {max_length}.")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("The tokenizer has neither `pad_token_id` nor `eos_token_id`; set `tokenizer.pad_token`.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding_side = padding_side
        self.with_response = with_response
        self.prompt_fn = prompt_fn or prompt_and_response
        self.pad_id = pad_id
        self.bos = [tokenizer.bos_token_id] if self._adds_bos(tokenizer) else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.image_transform = image_transform
        self.image_size = image_size
        self.image_tokens = image_tokens
        if image_model is not None:
            model_transform, model_size = timm_image_transform(image_model)
            self.image_transform = image_transform or model_transform
            self.image_size = image_size or model_size

    @staticmethod
    def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
        """Whether the tokenizer puts BOS in front of a plain string: its `add_bos_token`, or a post-processor that
        adds it while `add_bos_token` says False (LLaMA-3's; every fast tokenizer has the attribute since
        transformers 5)."""
        if tokenizer.bos_token_id is None:
            return False
        if getattr(tokenizer, "add_bos_token", None):
            return True
        return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode(self, sample: dict[str, Any]) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one sample, truncated to `max_length` and not padded."""
        prompt, response = self.prompt_fn(sample)
        prompt_ids = self._prompt_ids(prompt, with_image=sample.get("image") is not None)
        if not self.with_response:
            ids = prompt_ids[: self.max_length]
            return self._check_kept(ids, prompt_ids), [IGNORE_INDEX] * len(ids)
        # the response continues the prompt's text: both official code bases tokenise prompt + answer as one string
        # and mask as many tokens as the prompt alone has (a SentencePiece tokenizer would put its `▁` prefix in
        # front of a response tokenised alone)
        full = self._prompt_ids(prompt + response, with_image=sample.get("image") is not None) + self.eos
        ids = full[: self.max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + full[len(prompt_ids) :])[: self.max_length]
        return self._check_kept(ids, prompt_ids), labels

    def _prompt_ids(self, prompt: str, with_image: bool) -> list[int]:
        """BOS + the prompt's tokens; with LaVIN's `image_tokens`, an image's placeholders where the prompt has
        `<image>`, else after BOS. A prompt that starts with the BOS text (chat templates of LLaMA-2 and -3 do:
        `templates.chat_prompt`) gives one BOS, not two."""
        bos_text = self.tokenizer.bos_token
        if self.bos and bos_text and prompt.startswith(bos_text):
            prompt = prompt[len(bos_text) :]
        tokens = self.image_tokens
        if tokens is not None and prompt.count(IMAGE_MARKER) > int(with_image):
            raise ValueError(
                f"This prompt has {prompt.count(IMAGE_MARKER)} {IMAGE_MARKER!r} markers for "
                f"{int(with_image)} image (a sample carries at most one `image`): {prompt!r}."
            )
        if not with_image or tokens is None:
            return self.bos + self._tokens(prompt)
        if IMAGE_MARKER in prompt:
            before, after = prompt.split(IMAGE_MARKER, 1)
            ids = self.bos + self._tokens(before) + [tokens.token_id] + self._tokens(after)
            return ImageTokens(tokens.token_id, tokens.count, "placeholder").insert(ids)
        if tokens.position == "placeholder":
            raise ValueError(
                f"`image_tokens` place an image where the prompt says {IMAGE_MARKER!r}, but this prompt has none: "
                f"{prompt!r}."
            )
        return tokens.insert(self.bos + self._tokens(prompt), self.bos[0] if self.bos else None)

    def _check_kept(self, ids: list[int], prompt_ids: list[int]) -> list[int]:
        if self.image_tokens is not None and ids.count(self.image_tokens.token_id) != prompt_ids.count(
            self.image_tokens.token_id
        ):
            raise ValueError(
                f"`max_length`={self.max_length} cuts into an image's {self.image_tokens.count} placeholders; raise "
                "it or shorten the prompt before the image."
            )
        return ids

    def _pad(self, rows: Sequence[list[int]], value: int) -> torch.Tensor:
        width = max(len(row) for row in rows)
        padded = [
            [value] * (width - len(row)) + row if self.padding_side == "left" else row + [value] * (width - len(row))
            for row in rows
        ]
        return torch.tensor(padded, dtype=torch.long)

    def _image(self, image: Any) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return image
        if self.image_transform is None:
            raise ValueError(
                f"Got a {type(image).__name__} image but no transform: pass `image_model` (a timm model name) or "
                "`image_transform`, or give (3, S, S) tensors."
            )
        return self.image_transform(image)

    def _images(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [self._image(s["image"]) if s.get("image") is not None else None for s in samples]
        present = [image for image in images if image is not None]
        if not present and (self.image_size is None or self.image_tokens is not None):
            return {}
        shape = tuple(present[0].shape) if present else (3, self.image_size, self.image_size)
        if any(tuple(image.shape) != shape for image in present) or len(shape) != 3:
            raise ValueError(
                f"All images of a batch must share one (3, S, S) shape, got {[tuple(i.shape) for i in present]}."
            )
        zero = torch.zeros(shape)
        pixel_values = torch.stack([zero if image is None else image.float() for image in images])
        has_image = torch.tensor([image is not None for image in images])
        return {"pixel_values": pixel_values, "has_image": has_image}

    def grouping_lengths(self, samples: Sequence[dict[str, Any]]) -> list[int]:
        """`grouping_lengths` of `samples` as this collator encodes them: pass the result as `lengths` to
        transformers' `LengthGroupedSampler`, or as the dataset column that `TrainingArguments.length_column_name`
        names, for batches of one modality and similar lengths."""
        lengths = [len(self.encode(sample)[0]) for sample in samples]
        return grouping_lengths(lengths, [sample.get("image") is not None for sample in samples])

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("Cannot collate an empty list of samples.")
        encoded = [self.encode(sample) for sample in samples]
        ids = [row for row, _ in encoded]
        batch = {
            "input_ids": self._pad(ids, self.pad_id),
            "attention_mask": self._pad([[1] * len(row) for row in ids], 0),
        }
        if self.with_response:
            batch["labels"] = self._pad([labels for _, labels in encoded], IGNORE_INDEX)
        batch.update(self._images(samples))
        return batch
