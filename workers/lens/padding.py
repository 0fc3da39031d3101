"""Turn texts into right-padded batches on the model's device."""

from __future__ import annotations

from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch
from transformers import PreTrainedTokenizerBase

from workers.lens.errors import ContextTooLong, InvalidParameter


@dataclass(frozen=True)
class TextBatch:
    """``input_ids`` and ``attention_mask`` [batch, seq], right-padded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """[batch] number of real tokens per row."""
        return self.attention_mask.sum(dim=1)

    @property
    def last_positions(self) -> torch.Tensor:
        """[batch] index of each row's last real token."""
        return self.lengths - 1


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    device: torch.device,
    max_context: int | None = None,
    field: str = "texts",
) -> TextBatch:
    """Tokenise ``texts`` into one right-padded batch; too long a text is an error naming it."""
    if isinstance(texts, str) or not texts:
        raise InvalidParameter(field, "must be a non-empty list of texts")
    # numpy, then shared with torch: torch.tensor() of the nested lists is slower
    # (docs/performance.md)
    enc = tokenizer(list(texts), padding=True, return_tensors="np", padding_side="right")
    mask = torch.from_numpy(enc["attention_mask"]).long()  # no copy: int64 already
    lengths = mask.sum(dim=1).tolist()
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise InvalidParameter(field, f"texts {empty} produce no tokens")
    if max_context is not None:
        too_long = [i for i, n in enumerate(lengths) if n > max_context]
        if too_long:
            raise ContextTooLong(
                field, f"texts {too_long} exceed the model's context of {max_context} tokens"
            )
    input_ids = torch.from_numpy(enc["input_ids"]).long()
    return TextBatch(input_ids=input_ids.to(device), attention_mask=mask.to(device))


_DECODED: WeakKeyDictionary[PreTrainedTokenizerBase, dict[int, str]] = WeakKeyDictionary()
"""Per tokenizer, the text of every token id decoded so far: a token decodes alone the
same way every time, and decoding is a slow call per token."""


def token_strings(tokenizer: PreTrainedTokenizerBase, batch: TextBatch) -> list[list[str]]:
    """Each row's real tokens, each decoded on its own (so a client can label positions)."""
    known = _DECODED.setdefault(tokenizer, {})
    rows = zip(batch.input_ids.tolist(), batch.lengths.tolist(), strict=True)
    out = []
    for ids, n in rows:
        for t in ids[:n]:
            if t not in known:
                known[t] = str(tokenizer.decode([t]))
        out.append([known[t] for t in ids[:n]])
    return out
