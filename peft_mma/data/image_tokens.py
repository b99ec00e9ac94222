"""Where an image sits in `input_ids` for LaVIN: n copies of a placeholder id (DESIGN.md decision 3).

LaVIN's model writes an image's n visual tokens at its n placeholders (`peft_mma.lavin.inputs`), as LLaVA-style models
in transformers do; lengths never change inside the model. `ImageTokens` puts them there, for the collator and for
users who tokenize prompts themselves:

    tokens = ImageTokens.from_config(model.peft_config["default"])   # after get_peft_model / from_pretrained
    ids = tokens.insert(tokenizer("…")["input_ids"], bos_token_id=tokenizer.bos_token_id)    # one sample
    batch = tokens.expand(input_ids, attention_mask, labels, has_image, bos_token_id=tokenizer.bos_token_id,
                          padding_side="left")                                        # a padded batch to generate from

Positions (`LaVINConfig.image_token_position`): `"after_bos"` puts them right after a leading BOS (at the start
otherwise), the official `[BOS, V, text…]` (spec `lavin_mma.md` §4); `"placeholder"` puts them in place of the one
`token_id` the sample holds (the collator writes it where a prompt has `IMAGE_MARKER`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IMAGE_MARKER = "<image>"  # in a collator prompt: where the image goes (position "placeholder")
IGNORE_INDEX = -100
POSITIONS = ("after_bos", "placeholder")


@dataclass(frozen=True)
class ImageTokens:
    """`count` copies of the placeholder `token_id` per image, put at `position`."""

    token_id: int
    count: int
    position: str = "after_bos"

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"`position`={self.position!r} is not one of {POSITIONS}.")
        if self.count < 1:
            raise ValueError(f"`count` must be at least 1 (the visual tokens per image); got {self.count}.")

    @classmethod
    def from_config(cls, config) -> ImageTokens:
        """From an attached `LaVINConfig` (`model.peft_config[name]`), which records the id and the count."""
        if getattr(config, "image_token_id", None) is None or getattr(config, "num_image_tokens", None) is None:
            raise ValueError(
                "This config has no `image_token_id`/`num_image_tokens` yet: they are filled in when a LaVIN config "
                "with a `vision_model` is attached (`get_peft_model`, `PeftModel.from_pretrained`); pass "
                "`model.peft_config[name]`."
            )
        return cls(config.image_token_id, config.num_image_tokens, config.image_token_position)

    def slot(self, ids: Sequence[int], bos_token_id: int | None = None) -> tuple[int, int]:
        """(index, ids replaced) where one sample's placeholders go (see the module docstring)."""
        if self.position == "after_bos":
            return int(bos_token_id is not None and list(ids[:1]) == [bos_token_id]), 0
        hits = [i for i, token in enumerate(ids) if token == self.token_id]
        if len(hits) != 1:
            raise ValueError(
                f"With `image_token_position`='placeholder' a sample with an image holds the placeholder "
                f"{self.token_id} once, where the image goes; this one holds it {len(hits)} times."
            )
        return hits[0], 1

    def insert(self, ids: Sequence[int], bos_token_id: int | None = None) -> list[int]:
        """One sample's ids with its image's `count` placeholders."""
        at, replaced = self.slot(ids, bos_token_id)
        return [*ids[:at], *[self.token_id] * self.count, *ids[at + replaced :]]

    def expand(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        bos_token_id: int | None = None,
        padding_side: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """A padded batch with each image sample's placeholders inserted (`insert`) and the batch padded again.

        The batch is padded with id 0 and label -100 on `padding_side` ("left" for `generate`, "right" for
        training); by default on the side it was padded on, left when a row's mask starts with 0, which a batch of
        equal lengths does not show: pass "left" for generation. The placeholders get mask 1 and label -100.
        `has_image` (B,) bool, all True by default. Returns `input_ids`, `attention_mask`, `has_image` and, if
        given, `labels`.
        """
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"`padding_side` must be 'left', 'right' or None, got {padding_side!r}.")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        flags = torch.ones(len(input_ids), dtype=torch.bool) if has_image is None else has_image.bool().cpu()
        left = bool((mask[:, 0] == 0).any()) if padding_side is None else padding_side == "left"
        rows, targets = [], []
        for i, keep in enumerate(mask.bool().cpu()):
            ids = input_ids[i].cpu()[keep].tolist()
            row_labels = labels[i].cpu()[keep].tolist() if labels is not None else []
            if flags[i]:
                at, replaced = self.slot(ids, bos_token_id)
                ids = [*ids[:at], *[self.token_id] * self.count, *ids[at + replaced :]]
                row_labels = [*row_labels[:at], *[IGNORE_INDEX] * self.count, *row_labels[at + replaced :]]
            rows.append(ids), targets.append(row_labels)
        out = {
            "input_ids": _pad(rows, 0, left),
            "attention_mask": _pad([[1] * len(row) for row in rows], 0, left),
            "has_image": flags,
        }
        if labels is not None:
            out["labels"] = _pad(targets, IGNORE_INDEX, left)
        return {k: v.to(input_ids.device) for k, v in out.items()}


def _pad(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows])
