"""One LaVIN `forward` or `generate` call: its inputs, checked and assembled, and the state it hands down
(DESIGN.md decisions 3 and 8; `lavin_mma.md` §3, §4).

Images live in `input_ids` as in Hugging Face's multimodal models: a sample with an image holds n copies of the
placeholder `config.image_token_id` (n = `config.num_image_tokens`), put there by `peft_mma.data.ImageTokens` (the
collator does it); a text-only sample holds none. The tuner embeds the text, writes the image's n visual tokens V at
the placeholders and puts the modality token E_m[m] (m = 1 with an image, 0 without) in front:

    inputs_embeds  = [E_m[m], embed(input_ids) with V at the placeholders]        (B, 1 + S, C)
    attention_mask = [1, mask]                    the caller's mask, the token an ordinary position in it
    position_ids   = [0, positions]               the text keeps the positions it has without the token
    labels         = [-100, -100, labels[1:]]     unchanged targets; -100 at the placeholders

Once every decoder adapter of the call's adapter is merged (`merge_adapter`), its routing lives in the weights and
nothing reads the token: the call then puts none in front (`modality_embedding=None`), and runs as the merged LLaMA
would on its own, with the caller's mask and positions (so SDPA keeps its unmasked causal kernel when decoding).

The modality token attends to itself alone and no other token attends to it, as in the official code (§3): the
attention function runs its kernel on the other positions, with the caller's mask (none for an unpadded batch, so
SDPA keeps its causal kernel), and gives the token's row its own value (`peft_mma.router`); each MM-adapter routes
the whole sample from its input at position 0. The KV cache keeps the token's key and value at position 0, and the
decoding steps leave it out the same way (`LaVINCall.front`). Logits (and hidden states) come back without the
token's row, so they line up with `input_ids`. `generate` prefills the same `inputs_embeds`; its decoding steps
reuse the routing weights of the prefill, kept in the call's `LaVINCall`, and it returns the prompt ids followed by
the new tokens, as any Hugging Face model does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import Cache, LogitsProcessor

from ..utils import check_has_image
from .config import LaVINConfig

IGNORE_INDEX = -100
WITH_VISION = "build the config with `vision_model=...` (e.g. LaVINConfig.from_preset('lavin-7b')) to use images."


@dataclass
class LaVINCall:
    """What one call hands down to every layer, as the keyword `attention.STATE_KWARG`.

    `front` says that the call put the modality token in front of its sequence (the learnt router), so that its
    keys, cached ones too, start with the token; `modality_token` that the current forward's input starts with it
    (every forward of a `forward` call, and the prefill of a `generate` call). The MM-adapters then route from it
    and, without gradients, record their weights in `routing`; the decoding steps that follow read them there. A
    call under gradients records nothing, so that every decoder layer runs the same code (one graph under regional
    compilation). `fixed` holds the weights of `router="modality"` instead, (1, 0) for a text-only sample and
    (0, 1) for one with an image, (B, 2); such a call has no modality token.
    """

    modality_token: bool = True
    front: int = 0  # 1: the call's keys start with the modality token, which no other token attends to
    fixed: torch.Tensor | None = None  # (B, 2) weights by modality (`router="modality"`); repeated once for beams
    routing: dict[str, torch.Tensor] = field(default_factory=dict)  # adapter key → (B, 2) routing weights
    mixed: dict[str, torch.Tensor] = field(default_factory=dict)  # adapter key → U_b of the decoding steps


class ModalityTokenConsumed(LogitsProcessor):
    """Marks the end of `generate`'s prefill: the decoding steps after it hold no modality token."""

    def __init__(self, call: LaVINCall) -> None:
        self.call = call

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.call.modality_token = False
        return scores


@dataclass
class Assembled:
    """The LLaMA inputs of one call, with the modality token in front (length 1 + S; `front` 1), or without it
    (length S; `front` 0: merged adapters)."""

    inputs_embeds: torch.Tensor  # (B, front + S, C)
    attention_mask: torch.Tensor | None  # (B, front + S)
    position_ids: torch.Tensor | None  # (B or 1, front + S)
    labels: torch.Tensor | None  # (B, front + S)
    has_image: torch.Tensor  # (B,) bool
    front: int = 1  # positions in front of the caller's sequence


def find_cache(kwargs: dict) -> Cache | None:
    """The KV cache among a call's keyword arguments, found by type (`cache` from transformers 5.24,
    `past_key_values` before)."""
    return next((value for value in kwargs.values() if isinstance(value, Cache)), None)


def check_call(
    config: LaVINConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    has_image: torch.Tensor | None,
    kwargs: dict,
) -> torch.Tensor:
    """Check one call's inputs before anything runs; return the per-sample image flag (B,) bool.

    Without `has_image`, a sample has an image when its `input_ids` hold placeholders. Raises `ValueError` with what
    was expected. Skipped under `torch.compile` (the checks read tensor values).
    """
    batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    cache = find_cache(kwargs)
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(
            "LaVIN routes every sample from a modality token at the start of the sequence, so it cannot continue "
            "from a filled KV cache; decode with `generate` on the whole prompt."
        )
    if has_image is not None:
        check_has_image(has_image, batch)
    if input_ids is None:
        if pixel_values is not None or (has_image is not None and bool(has_image.any())):
            raise ValueError(
                "Images need `input_ids` holding the image placeholders (`peft_mma.data.ImageTokens`); got "
                "`inputs_embeds`."
            )
        return torch.zeros(batch, dtype=torch.bool, device=inputs_embeds.device)
    counts = (input_ids == config.image_token_id).sum(-1)  # (B,)
    flags = has_image.to(counts.device) if has_image is not None else counts > 0
    if not config.has_vision and bool((flags | (counts > 0)).any()):
        raise ValueError(
            "Samples have images (`has_image`, or image placeholders "
            f"`image_token_id`={config.image_token_id} in `input_ids`) but this adapter has no vision model "
            f"(`vision_model`=None); {WITH_VISION}"
        )
    n = config.num_image_tokens or 0
    wrong = (counts != flags.long() * n).nonzero().flatten().tolist()
    if wrong:
        row = wrong[0]
        raise ValueError(
            f"Sample {row} holds {int(counts[row])} image placeholders (`image_token_id`={config.image_token_id}); "
            f"a sample with an image needs exactly {n} (`num_image_tokens`) and one without none. Build the inputs "
            "with `peft_mma.data.ImageTokens` or `CausalLMCollator(image_tokens=...)`."
        )
    if bool(flags.any()) and pixel_values is None:
        raise ValueError(
            "Samples have images (placeholders or `has_image`) but no `pixel_values` were passed. (The HF `Trainer` "
            "drops them unless `TrainingArguments(remove_unused_columns=False)`.)"
        )
    if pixel_values is not None and len(pixel_values) != batch:
        raise ValueError(
            f"`pixel_values` holds {len(pixel_values)} images for a batch of {batch} sequences; pass one (B, 3, H, W) "
            "row per sequence (any image for a text-only one)."
        )
    return flags


def check_aligned(inputs: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None) -> None:
    """`labels` and a 2-D `attention_mask` must have the (B, S) of the inputs (`input_ids`, or `inputs_embeds`'
    first two sizes): the call masks the placeholders in the labels and puts a column in front of the mask, where
    broadcasting would pair other rows or fail without naming the input. Reads shapes only."""
    shape = tuple(inputs.shape[:2])
    for name, value in (("labels", labels), ("attention_mask", attention_mask)):
        if value is None or (name == "attention_mask" and value.dim() != 2):
            continue
        if tuple(value.shape) != shape:
            raise ValueError(f"`{name}` must have the shape {shape} of the inputs (B, S); got {tuple(value.shape)}.")


def assemble(
    config: LaVINConfig,
    embed: torch.nn.Module,
    modality_embedding: torch.Tensor | None,
    encode: Callable[[torch.Tensor], torch.Tensor] | None,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    has_image: torch.Tensor,
) -> Assembled:
    """The LLaMA inputs of a call (module docstring): text embedded, V at the placeholders, E_m[m] in front.

    `encode` maps `pixel_values` (B, 3, H, W) to visual tokens (B, n, C); `has_image` (B,) is the checked flag.
    With `modality_embedding` None (merged adapters), no token goes in front and the mask, positions and labels are
    the caller's.
    """
    if input_ids is not None:
        placeholders = input_ids == config.image_token_id  # (B, S)
        embeds = embed(input_ids.masked_fill(placeholders, 0))  # (B, S, C); the placeholder id may be out of vocab
        if pixel_values is not None:
            visual = encode(pixel_values).to(embeds.dtype)  # (B, n, C)
            slot = (placeholders.cumsum(-1) - 1).clamp(0, visual.shape[1] - 1)  # (B, S): which visual token goes where
            gathered = visual.gather(1, slot[..., None].expand(-1, -1, visual.shape[-1]))  # (B, S, C)
            embeds = torch.where(placeholders[..., None], gathered, embeds)
        if labels is not None:
            labels = labels.masked_fill(placeholders, IGNORE_INDEX)
    else:
        embeds = inputs_embeds
    if modality_embedding is None:
        return Assembled(embeds, attention_mask, position_ids, labels, has_image, front=0)
    batch, length = embeds.shape[:2]
    token = modality_embedding[has_image.long()].to(embeds.dtype)  # (B, C): E_m[m]
    embeds = torch.cat([token[:, None], embeds], dim=1)  # (B, 1 + S, C)
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
    mask = torch.cat([attention_mask.new_ones(batch, 1), attention_mask], dim=1)  # (B, 1 + S)
    if position_ids is None:
        position_ids = torch.arange(length, device=embeds.device)[None]  # what LLaMA uses without a cache
    position_ids = torch.cat([position_ids.new_zeros(position_ids.shape[0], 1), position_ids], dim=1)
    if labels is not None:  # the token at 0 predicts nothing; every text position keeps its target
        labels = torch.cat([labels.new_full((batch, 2), IGNORE_INDEX), labels[:, 1:]], dim=1)
    return Assembled(embeds, mask, position_ids, labels, has_image)


def strip_modality_token(output, length: int):
    """Drop the modality token's row from the logits and hidden states of a model output (length 1 + S → S; an
    output of length S is left as it is). Attention weights have none: the kernel ran without the token."""
    logits = getattr(output, "logits", None)
    if logits is not None and logits.shape[1] == length + 1:
        output.logits = logits[:, 1:]
    hidden = getattr(output, "hidden_states", None)
    if hidden is not None:
        output.hidden_states = tuple(h[:, 1:] if h.shape[1] == length + 1 else h for h in hidden)
    return output  # attention weights come from the kernel's run without the token


def ids_for_processors(prompt: torch.Tensor, image_token_id: int, front: int) -> torch.Tensor:
    """The ids `generate`'s logits processors see, one per position of the assembled prompt: `front` stand-ins for
    the modality token, then the caller's ids with a stand-in at each image placeholder (whose id may lie outside
    the vocabulary). A row's stand-in is its first id that is no placeholder, so processors that read the set of
    prompt ids (`repetition_penalty`, `sequence_bias`) see only ids the caller passed; 0 for a row of placeholders
    alone or for a prompt given as embeddings (no ids). N-gram processors still see the extra positions."""
    if prompt.shape[1] == 0:
        return prompt.new_zeros(len(prompt), front)
    is_image = prompt == image_token_id
    first = (~is_image).to(torch.uint8).argmax(dim=1, keepdim=True)  # 0 where a row has no other id
    stand_in = torch.where((~is_image).any(dim=1, keepdim=True), prompt.gather(1, first), torch.zeros_like(first))
    return torch.cat([stand_in.expand(-1, front), torch.where(is_image, stand_in, prompt)], dim=1)


def restore_prompt(output, input_ids: torch.Tensor, prompt_length: int, front: int = 1):
    """`generate`'s sequences (B·k, front + S + new) → the caller's prompt ids, then the new tokens: (B·k, S + new);
    the prefill's hidden states lose the `front` rows as `strip_modality_token` does in a forward."""
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
    restored = torch.cat([prompt.to(sequences.device), sequences[:, front + prompt_length :]], dim=1)
    if isinstance(output, torch.Tensor):
        return restored
    output.sequences = restored
    hidden = getattr(output, "hidden_states", None)
    if hidden and front:  # per step, per layer; the first step is the prefill
        output.hidden_states = (tuple(h[:, front:] for h in hidden[0]), *hidden[1:])
    return output
