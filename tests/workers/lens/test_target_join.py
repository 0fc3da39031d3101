"""The ``"space"`` join against the seed library's ``PromptTokenizer``, on three tokenizers
built here: a byte-level BPE (GPT-2, Llama 3), a SentencePiece-style Metaspace BPE with a
BOS (Llama 2, Mistral) and the demo's word-level one.

The expected ids were produced by ``inteprelens==0.2.1``'s ``PromptTokenizer.tokenize`` on
these same tokenizers (in a scratch environment) and frozen here. The seed tokenises with
no special tokens; lens-server keeps the BOS the model's tokenizer adds, so the ids equal
the seed's after that leading BOS.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from workers.lens import demo
from workers.lens.prompt_targets import IGNORE, encode_prompt_targets

CPU = torch.device("cpu")

_WORDS = (
    "What", "The", " is", " the", " capital", " of", " France", " Paris", " equals", " 2",
    " +", " 4", "2", "?", " Rome", " Italy", " red", " cat", " blue", " dog", "+", " Par",
)  # fmt: skip
"""Words the hand-made BPEs know whole (a space marks a word start); others fall apart."""


def _chained(words: list[str], alphabet: list[str], specials: list[str]):
    """A vocabulary and merges that build each word left to right from single characters."""
    vocab = {token: i for i, token in enumerate([*specials, *alphabet])}
    merges: list[tuple[str, str]] = []
    for word in words:
        piece = word[0]
        for char in word[1:]:
            if piece + char not in vocab:
                vocab[piece + char] = len(vocab)
                merges.append((piece, char))
            piece += char
    return vocab, merges


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2's layout: byte-level pre-tokenizer, no prefix space, no BOS."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = [w.replace(" ", "Ġ") for w in _WORDS]
    vocab, merges = _chained(words, alphabet, ["<|endoftext|>"])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def metaspace_bpe() -> PreTrainedTokenizerFast:
    """Llama 2's layout: Metaspace pre-tokenizer (``▁`` first), a BOS on every text."""
    alphabet = sorted(
        {c for w in _WORDS for c in w.replace(" ", "▁")} | set("abcdefghijklmnopqrstuvwxyz?.,|")
    )
    words = [w.replace(" ", "▁") for w in _WORDS]
    vocab, merges = _chained(words, alphabet, ["<unk>", "<s>", "</s>"])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


TOKENIZERS = {
    "byte_level": byte_level_bpe,
    "metaspace": metaspace_bpe,
    "word_level": demo.build_tokenizer,
}

SEED_EXAMPLES = {
    # The seed's Quick Start, its CHG example and its PromptTokenizer docstring.
    "quick_start": ("What is the capital of France?", "Paris"),
    "chg_paris": ("The capital of France is", "Paris"),
    "chg_sum": ("2 + 2 equals", "4"),
    "docstring": ("What is 2+2?", "4"),
    # The same, written with a trailing space on the prompt or a leading one on the target.
    "trailing_space": ("The capital of France is ", "Paris"),
    "leading_space": ("The capital of France is", " Paris"),
    "two_words": ("The capital of Italy is", "Rome, Italy"),
    # A copy prompt of the demo's task with a word target, as the seed's users write it.
    "copy": ("red cat blue dog | red cat", "blue"),
}

SEED_IDS: dict[str, dict[str, tuple[list[int], int]]] = {
    "byte_level": {
        "quick_start": ([259, 263, 266, 273, 275, 281, 31, 286], 7),
        "chg_paris": ([261, 273, 275, 281, 263, 286], 5),
        "chg_sum": ([18, 294, 293, 292, 295], 4),
        "docstring": ([259, 263, 293, 11, 18, 31, 295], 6),
        "trailing_space": ([261, 273, 275, 281, 263, 286], 5),
        "leading_space": ([261, 273, 275, 281, 263, 286], 5),
        "two_words": ([261, 273, 275, 304, 263, 299, 12, 304], 5),
        "copy": ([82, 69, 68, 308, 312, 315, 221, 92, 307, 308, 312], 10),
    },
    "metaspace": {
        "quick_start": ([42, 45, 49, 52, 59, 61, 67, 8, 72], 8),
        "chg_paris": ([42, 47, 59, 61, 67, 49, 72], 6),
        "chg_sum": ([79, 80, 79, 78, 81], 4),
        "docstring": ([42, 45, 49, 79, 3, 6, 8, 81], 7),
        "trailing_space": ([42, 47, 59, 61, 67, 49, 72], 6),
        "leading_space": ([42, 47, 59, 61, 67, 49, 72], 6),
        "two_words": ([42, 47, 59, 61, 90, 49, 85, 4, 90], 6),
        "copy": ([93, 94, 98, 101, 42, 41, 93, 94, 98], 8),
    },
    "word_level": {
        "quick_start": ([3, 3, 3, 3, 3, 3, 3], 6),
        "chg_paris": ([3, 3, 3, 3, 3, 3], 5),
        "chg_sum": ([3, 3, 3, 3, 3], 4),
        "docstring": ([3, 3, 3, 3], 3),
        "trailing_space": ([3, 3, 3, 3, 3, 3], 5),
        "leading_space": ([3, 3, 3, 3, 3, 3], 5),
        "two_words": ([3, 3, 3, 3, 3, 3, 3], 5),
        "copy": ([8, 20, 9, 21, 5, 8, 20, 9], 7),
    },
}
"""(ids, index of the first target token) from ``PromptTokenizer.tokenize`` of the seed."""


def _encoded(name: str, join: str = "space"):
    tokenizer = TOKENIZERS[name]()
    prompts = [p for p, _ in SEED_EXAMPLES.values()]
    targets = [t for _, t in SEED_EXAMPLES.values()]
    batch = encode_prompt_targets(tokenizer, prompts, targets, CPU, target_join=join)
    return tokenizer, batch


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_space_join_gives_the_seeds_ids_after_the_bos(name: str) -> None:
    tokenizer, batch = _encoded(name)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    assert bool(bos) == (name != "byte_level")  # one tokenizer of each kind
    for row, example in enumerate(SEED_EXAMPLES):
        ids, start = SEED_IDS[name][example]
        n = batch.lengths[row]
        assert batch.input_ids[row, :n].tolist() == bos + ids, example
        supervised = (batch.labels[row, :n] != IGNORE).nonzero().flatten().tolist()
        assert supervised == list(range(len(bos) + start, n)), example
        assert batch.target_starts[row] == len(bos) + start


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_spaces_around_the_boundary_do_not_matter(name: str) -> None:
    _, batch = _encoded(name)
    rows = {example: row for row, example in enumerate(SEED_EXAMPLES)}
    same = [rows[e] for e in ("chg_paris", "trailing_space", "leading_space")]
    assert len({tuple(batch.input_ids[r, : batch.lengths[r]].tolist()) for r in same}) == 1
    assert len({batch.target_starts[r] for r in same}) == 1


def test_raw_join_is_the_literal_continuation() -> None:
    """A word target without its space glues onto the prompt's last word under "raw"."""
    words = demo.build_tokenizer()
    prompt, target = SEED_EXAMPLES["copy"]
    space = encode_prompt_targets(words, [prompt], [target], CPU)
    raw = encode_prompt_targets(words, [prompt], [target], CPU, target_join="raw")
    assert words.decode(space.input_ids[0][space.labels[0] != IGNORE]) == "blue"
    assert words.convert_ids_to_tokens(raw.input_ids[0].tolist())[-1] == demo.UNK  # "catblue"
    assert raw.lengths[0] == space.lengths[0] - 1
    spaced = encode_prompt_targets(words, [prompt], [" " + target], CPU, target_join="raw")
    assert spaced.input_ids.tolist() == space.input_ids.tolist()


def test_targets_starting_with_other_whitespace_keep_it() -> None:
    words = demo.build_tokenizer()
    batch = encode_prompt_targets(words, ["red cat  "], ["\nblue"], CPU)
    tokens = words.convert_ids_to_tokens(batch.input_ids[0].tolist())
    assert tokens == [demo.BOS, "red", "cat", "\n", "blue"]
    assert batch.target_starts == (3,)
