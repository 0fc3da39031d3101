"""Prompt/target encoding, the aba/abb task and data set parsing."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from workers.lens import demo, testing
from workers.lens.errors import ContextTooLong, InvalidParameter
from workers.lens.prompt_targets import IGNORE, encode_prompt_targets, generate_pattern

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """Byte-level BPE that prepends <s>: tokens can straddle the prompt/target boundary."""
    return testing.build_tokenizer()


@pytest.fixture(scope="module")
def words() -> PreTrainedTokenizerFast:
    return demo.build_tokenizer()


def _no_bos_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, "x": 2, "y": 3}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def _target_text(tok: PreTrainedTokenizerFast, ids: torch.Tensor, labels: torch.Tensor) -> str:
    return tok.decode(ids[labels != IGNORE])


def test_raw_targets_are_the_tokens_of_the_continuation(bpe: PreTrainedTokenizerFast) -> None:
    prompts = ["The capital of France is", "a b a. c d", "One two"]
    targets = [" Paris", " c.", " three four five"]
    batch = encode_prompt_targets(bpe, prompts, targets, CPU, target_join="raw")
    for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        joint = bpe(prompt + target)["input_ids"]
        n = batch.lengths[row]
        assert batch.input_ids[row, :n].tolist() == joint
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert (batch.labels[row, n:] == IGNORE).all()
        assert _target_text(bpe, batch.input_ids[row], batch.labels[row]) == target
        start = batch.target_starts[row]
        assert (batch.labels[row, :start] == IGNORE).all()
        assert (batch.labels[row, start:n] != IGNORE).all()
        assert bpe.decode(joint[:start]) + target == bpe.decode(joint)


def test_a_token_straddling_the_boundary_belongs_to_the_target(
    bpe: PreTrainedTokenizerFast,
) -> None:
    # "Par" + "is" are one token in this vocabulary's merge of " Paris"; cutting inside it
    # leaves a token holding prompt and target characters, which must be supervised.
    batch = encode_prompt_targets(
        bpe, ["The capital of France is Pa"], ["ris"], CPU, target_join="raw"
    )
    target_ids = batch.input_ids[0][batch.labels[0] != IGNORE]
    assert "ris" in bpe.decode(target_ids)
    assert batch.target_starts[0] >= 1


def test_tokenizers_without_offsets_encode_prompt_and_target_apart() -> None:
    slow = ByT5Tokenizer()  # pure Python, bytes as tokens, appends </s>
    assert not slow.is_fast
    batch = encode_prompt_targets(slow, ["red cat", "ab"], [" dog", "c"], CPU, target_join="raw")
    prompt, target = list(b"red cat"), list(b" dog")
    ids = [b + 3 for b in prompt + target]
    assert batch.input_ids[0].tolist() == ids
    assert batch.labels[0].tolist() == [IGNORE] * len(prompt) + ids[len(prompt) :]
    assert batch.lengths == (11, 3) and batch.target_starts == (7, 2)


def test_slow_tokenizers_take_the_space_join(words: PreTrainedTokenizerFast) -> None:
    slow = ByT5Tokenizer()
    batch = encode_prompt_targets(slow, ["ab "], ["c"], CPU)
    assert batch.input_ids[0].tolist() == [b + 3 for b in b"ab c"]
    assert batch.target_starts == (2,)


def test_word_targets_need_their_leading_space_only_when_raw(
    words: PreTrainedTokenizerFast,
) -> None:
    for target, join in ((" cat", "raw"), ("cat", "space"), (" cat", "space")):
        batch = encode_prompt_targets(words, ["red cat | red"], [target], CPU, target_join=join)
        assert _target_text(words, batch.input_ids[0], batch.labels[0]) == "cat"
        assert batch.lengths[0] == 6
    with pytest.raises(InvalidParameter) as err:
        encode_prompt_targets(words, ["red"], ["cat"], CPU, target_join="glue")
    assert err.value.field == "target_join"


def test_truncation_drops_prompt_tokens_from_the_left_and_keeps_bos(
    words: PreTrainedTokenizerFast,
) -> None:
    full = encode_prompt_targets(words, ["red cat blue dog | red cat"], [" blue dog"], CPU)
    cut = encode_prompt_targets(
        words, ["red cat blue dog | red cat"], [" blue dog"], CPU, max_length=5
    )
    ids = full.input_ids[0, : full.lengths[0]].tolist()
    assert cut.input_ids[0].tolist() == [ids[0], *ids[-4:]]
    assert _target_text(words, cut.input_ids[0], cut.labels[0]) == "blue dog"
    with pytest.raises(InvalidParameter) as err:
        encode_prompt_targets(words, ["red cat"], [" blue dog"], CPU, max_length=2)
    assert err.value.field == "max_length"


def test_invalid_pairs_name_the_field(words: PreTrainedTokenizerFast) -> None:
    cases = [
        ((["a", "b"], [" cat"]), "targets"),
        (([], []), "texts"),
        ((["red"], [""]), "targets"),
        ((["red"], ["   "]), "targets"),
    ]
    for (prompts, targets), field in cases:
        with pytest.raises(InvalidParameter) as err:
            encode_prompt_targets(words, prompts, targets, CPU)
        assert err.value.field == field
    with pytest.raises(InvalidParameter) as err:
        encode_prompt_targets(words, ["red"], [" cat"], CPU, field_prefix="forget_", max_length=1)
    assert err.value.field == "max_length"
    with pytest.raises(InvalidParameter) as err:
        encode_prompt_targets(_no_bos_tokenizer(), [""], ["x"], CPU, field_prefix="retain_")
    assert err.value.field == "retain_texts"
    with pytest.raises(ContextTooLong):
        encode_prompt_targets(words, ["red cat blue dog"], [" cat"], CPU, max_context=4)


def test_pattern_rows_are_formatted_as_the_authors_rows(words: PreTrainedTokenizerFast) -> None:
    for pattern in ("aba", "abb", "mixed"):
        prompts, targets = generate_pattern(words, pattern, 8, seed=1)
        assert (prompts, targets) == generate_pattern(words, pattern, 8, seed=1)
        rules = set()
        for prompt, target in zip(prompts, targets, strict=True):
            lines = prompt.split("\n")
            assert len(lines) == 5
            thirds = set()
            for line in lines[:4]:
                assert line.startswith(" ")
                a, b, c = line[1:].split(" ")
                assert a.endswith("^") and b.endswith("^") and a != b
                thirds.add((a[:-1], b[:-1]).index(c))
            assert len(thirds) == 1  # one rule per row
            a, b = lines[4][1:].split(" ")
            assert target == " " + (a[:-1], b[:-1])[thirds.pop()] and b.endswith("^")
            rules.add(prompt.split("\n")[0].split(" ")[3] == prompt.split(" ")[1][:-1])
        assert rules == ({True, False} if pattern == "mixed" else {pattern == "aba"})
        batch = encode_prompt_targets(words, prompts, targets, CPU)
        # Only the final token is scored: the target is one token, the row's last.
        assert all(n - s == 1 for n, s in zip(batch.lengths, batch.target_starts, strict=True))
        assert words.unk_token_id not in batch.input_ids.tolist()
    mixed = generate_pattern(words, "mixed", 64, seed=3)[0]
    aba = sum(p.split("\n")[0].split(" ")[3] == p.split(" ")[1][:-1] for p in mixed)
    assert aba == 32
    assert generate_pattern(words, "aba", 8, seed=1) != generate_pattern(words, "aba", 8, seed=2)


def test_pattern_words_are_single_tokens_with_bpe(bpe: PreTrainedTokenizerFast) -> None:
    prompts, targets = generate_pattern(bpe, "aba", 6, seed=0)
    batch = encode_prompt_targets(bpe, prompts, targets, CPU)
    assert all(n - s == 1 for n, s in zip(batch.lengths, batch.target_starts, strict=True))


def test_pattern_rejects_bad_parameters(words: PreTrainedTokenizerFast) -> None:
    with pytest.raises(InvalidParameter) as err:
        generate_pattern(words, "abc", 4)  # type: ignore[arg-type]
    assert err.value.field == "pattern"
    with pytest.raises(InvalidParameter) as err:
        generate_pattern(words, "aba", 0)
    assert err.value.field == "num_samples"
