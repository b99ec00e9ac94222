"""One `forward` or `generate` call of a LaVIN model: its image inputs, checked, and how it rewrites the LLaMA input.

`LaVINModel.forward` / `generate` take two keywords out of a call:

* `pixel_values` (B, 3, H, W) float, one row per sequence; `has_image` (B,) bool marks the rows that really have
  an image (default: all). Rows of text-only samples are ignored (zeros are fine); those samples get no visual
  tokens and are routed as text. Without `pixel_values` every sample is text.
* Visual tokens make image samples n tokens longer; mixed batches are re-padded as described in `lavin.sequence`
  (left when the batch is left-padded or when generating, else right). `generate` returns the original prompt ids
  followed by the new tokens; the visual tokens are not part of the returned ids.
* With adapters disabled (`disable_adapter()`), images are ignored and the base model runs unchanged.

They are checked (`new_call`) and kept as a `Call` while the LLaMA model runs. Its forward pre-hook then rewrites
the keyword arguments of every LLaMA forward of the call (`splice`):

* prefill (nothing cached yet): the visual tokens are encoded once and spliced into the input embeddings
  (`lavin.sequence`), which makes the attention mask, positions and labels longer;
* a decoding step of `generate` (a filled cache): the new tokens' mask is appended to the spliced prompt's mask and
  their positions continue from it, so that the cache and the mask keep the same length.

`generate` may expand each sample (beam search, `num_return_sequences`); everything per sample is then repeated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import Cache, PretrainedConfig

from ..vision.backbone import VisionBackbone
from .config import LaVINConfig
from .sequence import insert_visual_tokens, positions


@dataclass
class Call:
    """What one `forward`/`generate` call passed, and what is cached for its later decoding steps."""

    pixel_values: torch.Tensor | None = None
    has_image: torch.Tensor | None = None  # (B,) bool
    visual: torch.Tensor | None = None  # (B, n, C) projected visual tokens
    routing: dict[str, torch.Tensor] | None = None  # lavin_key → (2 modalities, 2) weights
    per_sample: tuple[int, dict] | None = None  # (batch, the weights per sample handed down), without grad
    prefix_mask: torch.Tensor | None = None  # (B, T) attention mask of the spliced prompt
    prefix_len: int = 0  # prompt length S before splicing


def find_cache(kwargs: dict) -> Cache | None:
    """The KV cache among a call's keyword arguments, found by type: its keyword is `cache` from transformers 5.24,
    `past_key_values` before."""
    return next((value for value in kwargs.values() if isinstance(value, Cache)), None)


def batch_of(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a call, from its first positional argument, `input_ids` or `inputs_embeds`."""
    for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return None


def expand(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat each of the len(x) samples batch // len(x) times along dim 0, as `generate` expands its batch."""
    return x if len(x) == batch else x.repeat_interleave(batch // len(x), dim=0)


def new_call(
    adapter_name: str,
    config: LaVINConfig,
    visual: VisionBackbone | None,
    pixel_values: torch.Tensor | None,
    has_image: torch.Tensor | None,
    batch: int | None,
) -> Call:
    """Check a call's image inputs for adapter `adapter_name`; raise `ValueError` before anything runs."""
    if has_image is not None:
        if not isinstance(has_image, torch.Tensor) or has_image.ndim != 1 or has_image.dtype != torch.bool:
            raise ValueError(f"`has_image` must be a 1-D bool tensor (one flag per sample); got {has_image!r}.")
        if batch is not None and len(has_image) != batch:
            raise ValueError(f"`has_image` has {len(has_image)} flags for a batch of {batch} sequences.")
        if bool(has_image.any()) and pixel_values is None:
            raise ValueError("`has_image` marks samples with images but no `pixel_values` were passed.")
    if pixel_values is None:
        return Call(has_image=has_image)
    if visual is None:
        raise ValueError(
            f"`pixel_values` were passed but adapter {adapter_name!r} has no vision model (`vision_model`=None); "
            "build the config with `vision_model=...` (e.g. LaVINConfig.from_preset('lavin-7b')) to use images."
        )
    visual.check_pixel_values(pixel_values, batch)
    if has_image is not None and len(has_image) != len(pixel_values):
        raise ValueError(f"`has_image` has {len(has_image)} flags for {len(pixel_values)} images.")
    if has_image is None:
        has_image = torch.ones(len(pixel_values), dtype=torch.bool)
    return Call(pixel_values=pixel_values, has_image=has_image.to(pixel_values.device))


def splice(
    call: Call,
    kwargs: dict,
    config: LaVINConfig,
    model_config: PretrainedConfig,
    embed: Callable[[torch.Tensor], torch.Tensor],
    encode: Callable[[torch.Tensor], torch.Tensor],
) -> dict:
    """The LLaMA keyword arguments of one forward of `call`, with its visual tokens (prefill) or extended to them
    (decoding). `embed` maps token ids to embeddings; `encode` maps images to visual tokens (B, n, C)."""
    past = find_cache(kwargs)
    past_len = past.get_seq_length() if past is not None else 0
    if past_len > 0:
        return _decoding_step(call, kwargs, past_len)
    input_ids, embeds = kwargs.pop("input_ids", None), kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = embed(input_ids)
    batch, length = embeds.shape[:2]
    images = len(call.has_image)
    if batch % images or (batch != images and past is None):  # only cached `generate` expands the batch
        raise ValueError(f"{images} images (`pixel_values`) for a batch of {batch} sequences.")
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
    if call.visual is None or torch.is_grad_enabled():
        call.visual = encode(call.pixel_values)
    left = past is not None or bool((mask[:, 0] == 0).any())
    embeds, new_mask, labels, position_ids = insert_visual_tokens(
        embeds,
        mask,
        kwargs.get("labels"),
        input_ids,
        expand(call.visual, batch),
        expand(call.has_image, batch),
        position=config.image_token_position,
        bos_id=model_config.bos_token_id,
        image_token_id=config.image_token_id,
        left=left,
    )
    limit = model_config.max_position_embeddings
    if embeds.shape[1] > limit:
        raise ValueError(
            f"With {call.visual.shape[1]} visual tokens the sequence has {embeds.shape[1]} positions, more than "
            f"`max_position_embeddings`={limit}; shorten the text."
        )
    call.prefix_mask, call.prefix_len = new_mask, length
    kwargs.update(inputs_embeds=embeds, attention_mask=new_mask, position_ids=position_ids)
    if labels is not None:
        kwargs["labels"] = labels
    return kwargs


def _decoding_step(call: Call, kwargs: dict, past_len: int) -> dict:
    """A cached step: mask = [spliced prompt mask, mask of the tokens since the prompt]; positions continue."""
    if call.prefix_mask is None:
        raise ValueError("`pixel_values` cannot be combined with a pre-filled KV cache.")
    step = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    batch = step.shape[0]
    prefix = expand(call.prefix_mask, batch)
    mask = kwargs.get("attention_mask")
    if mask is None:
        new = prefix.new_ones(batch, past_len - prefix.shape[1] + step.shape[1])
    else:
        new = mask[:, call.prefix_len :].to(prefix.dtype)
    full = torch.cat([prefix, new], dim=1)  # (B, past + step)
    return {**kwargs, "attention_mask": full, "position_ids": positions(full)[:, -step.shape[1] :]}
