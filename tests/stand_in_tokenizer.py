"""A word-level tokenizer built in memory: one token per word or punctuation run, so positions are predictable."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3, as in the tiny LLaMA configs of conftest.py


def word_tokenizer(
    texts: Iterable[str] = (), words: Iterable[str] = (), add_bos: bool = False, pad_is_eos: bool = False
) -> PreTrainedTokenizerFast:
    """Vocabulary: the specials, then `words`, then every new word of `texts` in order of appearance."""
    pre_tokenizer = pre_tokenizers.Whitespace()
    vocab: dict[str, int] = {token: i for i, token in enumerate(SPECIALS)}
    pieces = list(words) + [piece for text in texts for piece, _ in pre_tokenizer.pre_tokenize_str(text)]
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>" if pad_is_eos else "<pad>",
        add_bos_token=add_bos,
    )
