"""The benchmark's model and inputs: a random 6-layer, 384-wide Llama, texts of exact lengths.

Random weights are enough: the time of a forward pass does not depend on what the
model learned. The tokenizer is the test suite's small byte-level BPE, so nothing is
downloaded; the model's vocabulary (8192) is larger than the tokenizer's, so that the
LM head and the logits have a realistic share of the work and of the result size.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from workers.lens.testing import build_tokenizer

GEOMETRY = {
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "vocab_size": 8192,
    "max_position_embeddings": 512,
}
_WORDS = [
    "the",
    "capital",
    "of",
    "is",
    "and",
    "a",
    "b",
    "c",
    "d",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
]
_ONE_TOKEN_FILLERS = ["a", "b", "c", "d"]


def build_bench_model(path: Path) -> Path:
    """Save the random Llama and its tokenizer into ``path`` (reused when already there)."""
    if (path / "config.json").is_file():
        return path
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        **GEOMETRY,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def texts_of_length(
    tokenizer: PreTrainedTokenizerBase, count: int, tokens: int, seed: int = 0
) -> list[str]:
    """``count`` different texts of exactly ``tokens`` tokens each (BOS included)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        words: list[str] = []
        while True:
            word = rng.choice(_WORDS)
            if _length(tokenizer, [*words, word]) > tokens:
                break
            words.append(word)
        while _length(tokenizer, words) < tokens:
            words.append(rng.choice(_ONE_TOKEN_FILLERS))
        if _length(tokenizer, words) != tokens:
            raise RuntimeError(f"could not build a text of {tokens} tokens")
        texts.append(" ".join(words))
    return texts


def _length(tokenizer: PreTrainedTokenizerBase, words: list[str]) -> int:
    return len(tokenizer(" ".join(words))["input_ids"])
