"""Prompt/target batches for the gate fits and ablations, and the synthetic aba/abb task.

How a prompt and its target are joined (``target_join``):

- ``"space"`` (the default): the seed library's and the CHG authors' convention. The
  prompt's trailing whitespace is stripped, the target gets one leading space unless it
  already starts with whitespace, and the two are tokenised apart, which forces a token
  boundary between them (the authors insert a marker token and remove it afterwards;
  tokenising apart gives the same ids, since a tokenizer splits its input at added tokens
  before anything else). A target written as users write it (``"Paris"``) is therefore
  the word ``" Paris"``, and prompt tokens never merge with target tokens.
- ``"raw"``: the target is the literal continuation of the prompt's characters:
  prompt + target is tokenised as one string and the target's tokens are the ones whose
  character span reaches into the target (a token straddling the boundary counts as
  target: predicting it requires predicting the target). A tokenizer without offsets
  tokenises the two apart instead.

BOS, under both: the prompt is tokenised with the model tokenizer's own special tokens
(a BOS where the model's tokenizer adds one; special tokens it appends, such as an EOS,
are dropped), and no BOS ever comes before the target. The seed tokenises with no special
tokens at all; keeping the BOS is what the model saw in training, which matters for most
models that use one. Only target tokens are supervised.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, cast

import torch
from transformers import PreTrainedTokenizerBase

from workers.lens.errors import ContextTooLong, InvalidParameter

IGNORE = -100
"""Label of positions that are not supervised (prompt and padding)."""

TargetJoin = Literal["space", "raw"]
TARGET_JOINS: tuple[str, ...] = ("space", "raw")
Pattern = Literal["mixed", "aba", "abb"]
PATTERNS: tuple[str, ...] = ("mixed", "aba", "abb")
PATTERN_MARK = "^"
"""Follows each of a line's first two words, as in the authors' rows (``flow^ started^ flow``)."""

_PATTERN_LINES = 4
_PATTERN_SCAN = 5000


@dataclass(frozen=True)
class TargetBatch:
    """Right-padded prompt + target token ids, with the targets marked.

    ``input_ids``, ``attention_mask`` and ``labels`` are [batch, seq] on the model's device.
    ``labels`` follows the Hugging Face convention: it equals ``input_ids`` at target tokens
    and ``IGNORE`` elsewhere, so the logits at position ``t - 1`` are scored against
    ``labels[:, t]``. ``lengths`` and ``target_starts`` (index of each row's first target
    token) stay on the host so that batches can be planned without a device sync.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    lengths: tuple[int, ...]
    target_starts: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, index: range | list[int], on_device: torch.Tensor | None = None) -> TargetBatch:
        """Some rows, trimmed to their longest length.

        ``on_device`` is ``index`` already on the device: copying indices there would make
        the host wait for queued device work. A step-1 ``range`` is sliced instead.
        """
        seq = max(self.lengths[i] for i in index)
        rows: slice | torch.Tensor
        if on_device is not None:
            rows = on_device
        elif isinstance(index, range) and index.step == 1:
            rows = slice(index.start, index.stop)
        else:
            rows = torch.tensor(list(index), device=self.input_ids.device)
        return TargetBatch(
            input_ids=self.input_ids[rows, :seq],
            attention_mask=self.attention_mask[rows, :seq],
            labels=self.labels[rows, :seq],
            lengths=tuple(self.lengths[i] for i in index),
            target_starts=tuple(self.target_starts[i] for i in index),
        )


def encode_prompt_targets(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    targets: list[str],
    device: torch.device,
    *,
    target_join: str = "space",
    max_length: int | None = None,
    max_context: int | None = None,
    field_prefix: str = "",
) -> TargetBatch:
    """Tokenise prompt/target pairs, joined as ``target_join`` says (see the module
    docstring), into one right-padded ``TargetBatch``.

    ``max_length`` truncates prompt + target by dropping prompt tokens from the left (a
    leading BOS is kept when there is room); a target that does not fit with at least one
    prompt token is an error, as is a sequence longer than ``max_context``. Error fields are
    ``<field_prefix>texts`` and ``<field_prefix>targets``.
    """
    texts_field, targets_field = f"{field_prefix}texts", f"{field_prefix}targets"
    if not prompts:
        raise InvalidParameter(texts_field, "must hold at least one prompt")
    if len(prompts) != len(targets):
        raise InvalidParameter(
            targets_field,
            f"{len(targets)} targets for {len(prompts)} prompts; they must match one to one",
        )
    empty = [i for i, t in enumerate(targets) if not t]
    if empty:
        raise InvalidParameter(targets_field, f"targets {empty} are empty")
    if max_length is not None and max_length < 2:
        raise InvalidParameter("max_length", f"must be at least 2, got {max_length}")
    if target_join == "space":
        pairs = _tokens_apart(tokenizer, *join_with_space(prompts, targets))
    elif target_join == "raw":
        pairs = _split_tokens(tokenizer, prompts, targets)
    else:
        raise InvalidParameter(
            "target_join", f"must be one of {list(TARGET_JOINS)}, got {target_join!r}"
        )
    special = _added_specials(tokenizer)
    sequences, starts = [], []
    for i, (prompt_ids, target_ids) in enumerate(pairs):
        if not target_ids:
            raise InvalidParameter(targets_field, f"target {i} ({targets[i]!r}) gives no tokens")
        if not prompt_ids:
            raise InvalidParameter(
                texts_field, f"text {i} gives no token before its target, so nothing predicts it"
            )
        if max_length is not None and len(prompt_ids) + len(target_ids) > max_length:
            prompt_ids = _truncate_prompt(prompt_ids, max_length - len(target_ids), special, i)
        if max_context is not None and len(prompt_ids) + len(target_ids) > max_context:
            raise ContextTooLong(
                texts_field,
                f"text {i} and its target take {len(prompt_ids) + len(target_ids)} tokens, "
                f"more than the model's context of {max_context}",
            )
        sequences.append(prompt_ids + target_ids)
        starts.append(len(prompt_ids))
    return _pad(sequences, starts, tokenizer.pad_token_id or 0, device)


def join_with_space(prompts: list[str], targets: list[str]) -> tuple[list[str], list[str]]:
    """The ``"space"`` join's texts: prompts without trailing whitespace, targets with one
    leading space unless they start with whitespace."""
    return (
        [p.rstrip() for p in prompts],
        [t if t[:1].isspace() else " " + t for t in targets],
    )


def _tokens_apart(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], targets: list[str]
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) per pair, each tokenised on its own: the prompt with the
    tokenizer's special tokens (a BOS, say) less any it appends, the target with none."""
    special = _added_specials(tokenizer)
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    return [(_strip_trailing(p, special), t) for p, t in zip(prompt_ids, target_ids, strict=True)]


def _split_tokens(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], targets: list[str]
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) per pair of the ``"raw"`` join; special tokens after the
    target (an EOS) are dropped."""
    if not tokenizer.is_fast:
        # No offsets: tokenise apart, keeping the prompt's leading specials (a BOS) only.
        return _tokens_apart(tokenizer, prompts, targets)
    special = _added_specials(tokenizer)
    full = [p + t for p, t in zip(prompts, targets, strict=True)]
    enc = tokenizer(full, add_special_tokens=True, return_offsets_mapping=True)
    pairs: list[tuple[list[int], list[int]]] = []
    for prompt, ids, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"], strict=True):
        cut = len(prompt)
        # A token whose span was trimmed to nothing (a lone space) sits at its position.
        in_target = [
            end > cut or (start >= cut and token not in special)
            for token, (start, end) in zip(ids, offsets, strict=True)
        ]
        if not any(in_target):
            pairs.append((ids, []))
            continue
        first = in_target.index(True)
        last = len(in_target) - 1 - in_target[::-1].index(True)
        pairs.append((ids[:first], ids[first : last + 1]))
    return pairs


def _added_specials(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the special tokens a tokenizer adds around a text (BOS, EOS, …); the unknown
    token stands for text, so it is not one of them."""
    return set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}


def _strip_trailing(ids: list[int], special: set[int]) -> list[int]:
    end = len(ids)
    while end and ids[end - 1] in special:
        end -= 1
    return ids[:end]


def _truncate_prompt(prompt_ids: list[int], room: int, special: set[int], row: int) -> list[int]:
    if room < 1:
        raise InvalidParameter(
            "max_length", f"the target of text {row} leaves no room for its prompt"
        )
    lead = 0
    while lead < len(prompt_ids) and prompt_ids[lead] in special:
        lead += 1
    if lead and room > lead:
        return prompt_ids[:lead] + prompt_ids[len(prompt_ids) - (room - lead) :]
    return prompt_ids[len(prompt_ids) - room :]


def _pad(
    sequences: list[list[int]], starts: list[int], pad_id: int, device: torch.device
) -> TargetBatch:
    seq = max(map(len, sequences))
    input_ids = torch.full((len(sequences), seq), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), seq), dtype=torch.long)
    labels = torch.full((len(sequences), seq), IGNORE, dtype=torch.long)
    for row, (ids, start) in enumerate(zip(sequences, starts, strict=True)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, start : len(ids)] = input_ids[row, start : len(ids)]
    return TargetBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        labels=labels.to(device),
        lengths=tuple(map(len, sequences)),
        target_starts=tuple(starts),
    )


def generate_pattern(
    tokenizer: PreTrainedTokenizerBase,
    pattern: str,
    num_samples: int,
    seed: int | None = None,
) -> tuple[list[str], list[str]]:
    """Prompts and targets of the aba/abb rule-induction task, as the CHG authors' rows.

    A prompt holds four complete lines, each with its own pair of distinct words, then an
    incomplete one: `` flow^ started^ flow`` (aba) or `` flow^ started^ started`` (abb),
    lines joined by newlines, the last line `` a^ b^``; the target (`` a`` or `` b``)
    completes it and is one token, so only the final token is scored. ``"mixed"`` (the
    paper's set) draws half the rows from each rule, in random order, so the model has to
    infer the rule from the complete lines. Words are vocabulary tokens that come back as
    one token when encoded with a leading space.
    """
    if pattern not in PATTERNS:
        raise InvalidParameter("pattern", f"must be one of {list(PATTERNS)}, got {pattern!r}")
    if num_samples < 1:
        raise InvalidParameter("num_samples", f"must be at least 1, got {num_samples}")
    rng = random.Random(seed)
    words = _single_token_words(tokenizer, rng)
    if pattern == "mixed":
        rules = ["aba"] * ((num_samples + 1) // 2) + ["abb"] * (num_samples // 2)
        rng.shuffle(rules)
    else:
        rules = [pattern] * num_samples
    prompts, targets = [], []
    for rule in rules:
        third = 0 if rule == "aba" else 1
        lines = [rng.sample(words, 2) for _ in range(_PATTERN_LINES + 1)]
        mark = PATTERN_MARK
        complete = [f" {a}{mark} {b}{mark} {(a, b)[third]}" for a, b in lines[:-1]]
        a, b = lines[-1]
        prompts.append("\n".join([*complete, f" {a}{mark} {b}{mark}"]))
        targets.append(f" {(a, b)[third]}")
    return prompts, targets


def _single_token_words(tokenizer: PreTrainedTokenizerBase, rng: random.Random) -> list[str]:
    """Words (letters only, else any visible text) that encode as one token after a space."""
    vocab = len(tokenizer)
    ids = (
        range(vocab) if vocab <= _PATTERN_SCAN else sorted(rng.sample(range(vocab), _PATTERN_SCAN))
    )
    special = _added_specials(tokenizer)
    candidates = sorted(
        {
            w
            for i in ids
            if i not in special
            and (w := cast(str, tokenizer.decode([i])).strip())
            and w != PATTERN_MARK
            and not any(c.isspace() for c in w)
        }
    )
    encoded = tokenizer([" " + w for w in candidates], add_special_tokens=False)["input_ids"]
    single = [
        w for w, e in zip(candidates, encoded, strict=True) if len(e) == 1 and w.isprintable()
    ]
    alpha = [w for w in single if w.isalpha()]
    words = alpha if len(alpha) >= 2 else single
    if len(words) < 2:
        raise InvalidParameter(
            "pattern", "the model's vocabulary has fewer than two single-token words"
        )
    return words
