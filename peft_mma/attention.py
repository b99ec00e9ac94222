"""The attention function both methods run in: the model's own implementation plus what each method adds to it.

It is registered with transformers' `AttentionInterface` under `<implementation>+mma` and wraps the configured one
(eager, sdpa, flash, …), so the base kernel is untouched and nothing is recomputed. Per-call state arrives as the
forward keyword `STATE_KWARG`, which transformers passes from `LlamaForCausalLM.forward` down to every attention
call, also when activation checkpointing recomputes a layer.

* LLaMA-Adapter V2 (spec `llama_adapter_v2.md` §2c, DESIGN decision 2): for a prompted layer, per head h and with
  the query q the attention already computed (after bias, LoRA and RoPE),

      o_h ← o_h + a(g_h) · ν · softmax(q_h k_pᵀ / √d) v_p            k_p = W_k P,  v_p = W_v P   (P: K × C)

  a separate softmax over the K prompt keys (no mask, no RoPE), added *before* `o_proj`. Which prompts a layer has
  is asked of its `o_proj`: a module there with a `gated_prompt_term(attention, query, state)` method returns the
  term (the prompts are an input-side term of `o_proj`).
* LaVIN (spec `lavin_mma.md` §3, DESIGN decision 3): when the call's keys start with the modality token (its learnt
  router), no other token attends to it: the wrapped kernel runs on the other positions alone, with the caller's mask
  sliced to them (`peft_mma.router.without_modality_token`), and where the queries hold the token too, its row, which
  attends to itself alone, goes in front (`peft_mma.router.modality_token_attention`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .router import modality_token_attention, without_modality_token

STATE_KWARG = "mma_call"
SUFFIX = "+mma"


def gated_prompt_key_value(
    prompt_key: torch.Tensor, prompt_value: torch.Tensor, gate: torch.Tensor, heads: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head prompt keys and gated values, (B or 1, H, K, d) each, in `dtype`.

    The gate moves onto the values, g_h · softmax(q k_pᵀ) v_p = softmax(q k_pᵀ)(g_h v_p), so that it costs K rows
    once per call instead of a pass over (B, H, T, d) per layer and step; grouped-query heads are repeated as in
    transformers' `repeat_kv` (query head h reads key/value head h // (H / H_kv)).
    """
    groups = heads // prompt_key.shape[1]
    key, value = prompt_key.to(dtype), prompt_value.to(dtype)
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return key, value * gate.to(dtype).view(1, heads, 1, 1)


def prompt_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """softmax(q kᵀ · scaling) v with no mask: query (B, H, T, d), key/value (B, H, K, d) → (B, T, H, d)."""
    return F.scaled_dot_product_attention(query, key, value, scale=scaling).transpose(1, 2)


class _SeenAsBase:
    """`target` (an attention module or its config) with some attributes of its own, every other one `target`'s.

    Flash attention picks its kernel from `module.config._attn_implementation`, which names our wrapper
    (`flash_attention_2+mma`, no kernel of that name exists); the wrapped implementation is handed the module seen
    through a config that names the implementation itself.
    """

    def __init__(self, target, **own) -> None:
        self.__dict__.update(own, _target=target)

    def __getattr__(self, name: str):
        return getattr(self._target, name)


def _wrapped(base_name: str):
    reads_its_name = "flash" in base_name  # what transformers' `is_flash_attention_requested` checks

    def attention(module, query, key, value, attention_mask, **kwargs):
        state = kwargs.pop(STATE_KWARG, None)
        base = ALL_ATTENTION_FUNCTIONS.get(base_name, eager_attention_forward)  # a Mapping in every 5.x
        seen = module
        if reads_its_name:
            seen = _SeenAsBase(module, config=_SeenAsBase(module.config, _attn_implementation=base_name))
        rows = 0  # LaVIN: query rows of the modality token in front (1 in the call's first forward, 0 decoding)
        if getattr(state, "front", 0):  # LaVIN: key position 0 is the modality token
            rows = int(state.modality_token)
            kwargs = _without_front_positions(kwargs, rows, query.shape[2])
            attention_mask = without_modality_token(attention_mask, rows)
            sliced = (query[:, :, rows:], key[:, :, 1:], value[:, :, 1:])
            if torch.compiler.is_compiling():
                # laid out anew: over dynamic lengths inductor kept the RoPE outputs' slices at a stride of the text
                # length instead of 1 + it, and the compiled backward of a third length failed its stride check
                sliced = tuple(t.contiguous() for t in sliced)
            output, weights = base(seen, *sliced, attention_mask, **kwargs)
        else:
            output, weights = base(seen, query, key, value, attention_mask, **kwargs)
        if rows:
            output = modality_token_attention(output, value)
        prompt_term = getattr(module.o_proj, "gated_prompt_term", None)  # LLaMA-Adapter V2: the gated prompts
        if prompt_term is not None:
            term = prompt_term(module, query, state)
            if term is not None:
                output = output + (term if term.dtype == output.dtype else term.to(output.dtype))
        return output, weights

    attention.__name__ = f"mma_attention_{base_name}"
    return attention


def _without_front_positions(kwargs: dict, rows: int, length: int) -> dict:
    """The kernel's keyword arguments for the positions after the modality token: flash attention reads
    `position_ids` (B, length) to find packed sequences, which must line up with the queries it gets."""
    positions = kwargs.get("position_ids")
    if rows and isinstance(positions, torch.Tensor) and positions.shape[-1] == length:
        return {**kwargs, "position_ids": positions[..., rows:]}
    return kwargs


@contextmanager
def state_handed_to(modules: Iterable[torch.nn.Module], state) -> Iterator[None]:
    """Within the block, every call of `modules` gets `state` as the keyword `STATE_KWARG`.

    For calls whose keywords we do not write: `generate`'s forwards (it only passes on keywords that the model's
    forward names) and modules that transformers calls without keywords (a LLaMA layer's `mlp`). The forward
    pre-hooks add this one keyword, change no other argument, and are removed when the block ends.
    """

    def add_state(module, hook_args, hook_kwargs):
        hook_kwargs[STATE_KWARG] = state
        return hook_args, hook_kwargs

    handles = [module.register_forward_pre_hook(add_state, with_kwargs=True) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def install_mma_attention(model: torch.nn.Module) -> None:
    """Switch `model` (a transformers `PreTrainedModel`) to the wrapped version of its attention implementation
    (idempotent). The wrapper is registered in this process where the config names it already: a model pickled
    in another process carries the wrapped name."""
    current = model.config._attn_implementation or "eager"
    base_name = current.removesuffix(SUFFIX)
    name = base_name + SUFFIX
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _wrapped(base_name))
        mask = ALL_MASK_ATTENTION_FUNCTIONS.get(base_name)
        if mask is not None:
            AttentionMaskInterface.register(name, mask)
    if current != name:
        _set_implementation(model, name)


def uninstall_mma_attention(model: torch.nn.Module) -> None:
    """Restore the implementation `install_mma_attention` wrapped."""
    name = model.config._attn_implementation
    if name is not None and name.endswith(SUFFIX):
        _set_implementation(model, name.removesuffix(SUFFIX))


def _set_implementation(model: torch.nn.Module, name: str) -> None:
    """`model.set_attn_implementation(name)`, transformers' public switch, for a registered `name`. transformers
    reads a name with "flash" in it as a flash-attention kernel to load (it would look for a Hub kernel called
    `flash_attention_2+mma`), and a model that cannot switch its implementation keeps it with a warning; in those two
    cases the config field is set as `set_attn_implementation` would set it."""
    if "flash" not in name and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        model.config._attn_implementation = name
