"""Prompt templates: the Alpaca template of LLaMA-Adapter V2, expert context, LaVIN's ScienceQA format, chat.

- LLaMA-Adapter V2 wraps every instruction in the Alpaca template and tokenises it with a BOS
  (spec/llama_adapter_v2.md §3.8); `format_prompt` builds it, with or without the `### Input:` block.
- Expert models (a captioner, an OCR system) enter at inference as text only (spec/llama_adapter_v2.md §6):
  `expert_context_prompt` puts their output in the `### Input:` slot. The slot is our inference; the official
  repository has no code for it.
- LaVIN's ScienceQA prompt is `Question/Context/Options/Response:` and the target starts with
  "The answer is X." (spec/lavin_mma.md §6); `scienceqa_prompt` and `scienceqa_answer` build them, the latter also
  in ScienceQA's explanation-first ("EA") output format.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def format_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt; the `### Input:` block appears only when `input` is a non-empty string.

    The prompt ends with "### Response:" and no trailing space or newline; the response is appended to it.
    """
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def expert_context(experts: Mapping[str, str] | str) -> str:
    """Render expert-model outputs as one context text, one `Name: text` line per expert, in the given order.

    Example: `{"Caption": "a dog on a sofa", "OCR": "SALE"}` → "Caption: a dog on a sofa\\nOCR: SALE".
    Empty outputs are dropped; a plain string is returned unchanged.
    """
    if isinstance(experts, str):
        return experts.strip()
    return "\n".join(f"{name}: {text.strip()}" for name, text in experts.items() if text and text.strip())


def context_with_experts(experts: Mapping[str, str] | str, context: str | None = None) -> str | None:
    """The expert context followed by an existing `context`, separated by a blank line (None when both are empty)."""
    return "\n\n".join(part for part in (expert_context(experts), context or "") if part) or None


def expert_context_prompt(instruction: str, experts: Mapping[str, str] | str, input: str | None = None) -> str:
    """The Alpaca prompt with expert-model outputs (caption, OCR, ...) as the `### Input:` context.

    Spec/llama_adapter_v2.md §6: experts are prompt-level composition at inference, nothing in the tuner changes.
    An existing `input` comes after the expert context, separated by a blank line.
    """
    return format_prompt(instruction, context_with_experts(experts, input))


def format_options(options: Sequence[str]) -> str:
    """`["cat", "dog"]` → "(A) cat (B) dog", LaVIN's option list (spec/lavin_mma.md §6)."""
    if not 1 <= len(options) <= len(OPTION_LETTERS):
        raise ValueError(f"`options` must hold 1 to {len(OPTION_LETTERS)} entries, got {len(options)}.")
    return " ".join(f"({OPTION_LETTERS[i]}) {option}" for i, option in enumerate(options))


def scienceqa_prompt(question: str, options: Sequence[str], context: str | None = None) -> str:
    """LaVIN's ScienceQA prompt: "Question: …\\nContext: …\\nOptions: (A) … (B) …\\nResponse:".

    An empty `context` is written as "N/A", as ScienceQA does for questions without one.
    """
    return f"Question: {question}\nContext: {context or 'N/A'}\nOptions: {format_options(options)}\nResponse:"


def balanced_answers(rng: random.Random, n: int, kinds: int, options: int = 4) -> list[int]:
    """The answer index of each of `n` questions whose kinds take turns (question i is of kind i % `kinds`): every
    kind's answers spread over the `options` as evenly as its count allows (exactly when `options` divides it), in
    an order drawn from `rng`. A balance over all the questions alone would let a kind lean to some letters, which a
    blind guess per kind then beats chance with."""
    per_kind = []
    for kind in range(kinds):
        letters = [j % options for j in range(len(range(kind, n, kinds)))]
        rng.shuffle(letters)
        per_kind.append(iter(letters))
    return [next(per_kind[i % kinds]) for i in range(n)]


def scienceqa_answer(answer: str | int, explanation: str | None = None, explanation_first: bool = False) -> str:
    """The ScienceQA target: "The answer is X." plus " BECAUSE: {explanation}" when one is given (ScienceQA's
    answer-first "ALE" output format, LaVIN's), or with `explanation_first` "{explanation} The answer is X."
    (ScienceQA's "EA" format: the model states what it sees before it picks the letter).

    `answer` is a letter or a 0-based option index. LaVIN appends the target to the prompt with no separator
    (spec/lavin_mma.md §6); the collator does the same.
    """
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(OPTION_LETTERS):
        letter = OPTION_LETTERS[answer]
    else:
        letter = answer
    if not isinstance(letter, str) or len(letter) != 1 or letter not in OPTION_LETTERS:
        raise ValueError(f"`answer` must be an option letter A-Z or an index, got {answer!r}.")
    target = f"The answer is {letter}."
    if explanation_first:
        if not explanation:
            raise ValueError("`explanation_first` needs an `explanation` to put before the answer.")
        return f"{explanation} {target}"
    return f"{target} BECAUSE: {explanation}" if explanation else target


def chat_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str, input: str | None = None) -> str:
    """The tokenizer's chat template for one user turn (with the generation prompt), or the Alpaca prompt.

    With a chat template the `input`, if any, follows the instruction after a blank line.
    """
    if getattr(tokenizer, "chat_template", None):
        content = f"{instruction}\n\n{input}" if input else instruction
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return format_prompt(instruction, input)
