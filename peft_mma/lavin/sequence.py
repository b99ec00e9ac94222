"""Where LaVIN's visual tokens go in the LLM input (`lavin_mma.md` §4, "Sequence assembly").

Officially every sample is `[E_m, BOS, "Image: ", P(CLIP) (n vectors), text…]`; here the modality token is replaced
by the router side pass (`peft_mma.router`) and the textual prefix is left to the prompt. Per sample with an image:

* `after_bos`: the n visual vectors go right after the first attended token when it is the model's BOS, else
  right before it;
* `placeholder`: they replace the single token `image_token_id` (the sequence grows by n − 1).

Visual positions get label -100 and attention mask 1. Text-only samples are left as they are. The rows are then
re-padded to a common length: on the left when the batch is already left-padded or a cache is passed (generation
appends on the right), otherwise on the right; padding has mask 0, label -100 and zero embeddings. Position ids are
`cumsum(mask) − 1` (0 on padding), which is what `generate` uses and equals `arange` for an unpadded row.
"""

from __future__ import annotations

import torch


def insertion_point(
    input_ids: torch.Tensor | None,
    mask: torch.Tensor,
    row: int,
    position: str,
    bos_id: int | None,
    image_token_id: int | None,
) -> tuple[int, int]:
    """(index, number of tokens removed) for the visual tokens of sample `row`."""
    if position == "placeholder":
        if input_ids is None:
            raise ValueError("`image_token_position`='placeholder' needs `input_ids` to find the placeholder token.")
        hits = (input_ids[row] == image_token_id).nonzero().flatten()
        if len(hits) != 1:
            raise ValueError(
                f"Sample {row} has an image but contains the placeholder `image_token_id`={image_token_id} "
                f"{len(hits)} times; put it exactly once in every sample that has an image."
            )
        return int(hits[0]), 1
    attended = mask[row].nonzero().flatten()
    first = int(attended[0]) if len(attended) else 0
    is_bos = input_ids is not None and bos_id is not None and int(input_ids[row, first]) == bos_id
    return first + int(is_bos), 0


def insert_visual_tokens(
    embeds: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor | None,
    input_ids: torch.Tensor | None,
    visual: torch.Tensor,
    has_image: torch.Tensor,
    *,
    position: str,
    bos_id: int | None,
    image_token_id: int | None,
    left: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Splice `visual` (B, n, C) into `embeds` (B, S, C) for rows where `has_image` (B,) is true.

    Returns (embeds (B, T, C), mask (B, T), labels (B, T) or None, position_ids (B, T)).
    """
    rows_e, rows_m, rows_l = [], [], []
    for i in range(embeds.shape[0]):
        e, m = embeds[i], mask[i]
        lab = labels[i] if labels is not None else None
        if bool(has_image[i]):
            p, r = insertion_point(input_ids, mask, i, position, bos_id, image_token_id)
            n = visual.shape[1]
            e = torch.cat([e[:p], visual[i].to(e.dtype), e[p + r :]])
            m = torch.cat([m[:p], m.new_ones(n), m[p + r :]])
            if lab is not None:
                lab = torch.cat([lab[:p], lab.new_full((n,), -100), lab[p + r :]])
        rows_e.append(e), rows_m.append(m), rows_l.append(lab)
    length = max(e.shape[0] for e in rows_e)
    out_e = torch.stack([_pad(e, length, 0.0, left) for e in rows_e])  # (B, T, C)
    out_m = torch.stack([_pad(m, length, 0, left) for m in rows_m])  # (B, T)
    out_l = torch.stack([_pad(lab, length, -100, left) for lab in rows_l]) if labels is not None else None
    return out_e, out_m, out_l, positions(out_m)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """cumsum(mask) − 1, and 0 on padding: (B, T)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _pad(x: torch.Tensor, length: int, value, left: bool) -> torch.Tensor:
    missing = length - x.shape[0]
    if missing == 0:
        return x
    pad = x.new_full((missing, *x.shape[1:]), value)
    return torch.cat([pad, x] if left else [x, pad])
