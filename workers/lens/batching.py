"""Turn texts into right-padded batches on the model's device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from workers.lens.errors import ContextTooLong


@dataclass(frozen=True)
class TextBatch:
    """``input_ids`` and ``attention_mask`` [batch, seq], right-padded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def last_positions(self) -> torch.Tensor:
        """[batch] index of each row's last real token."""
        return self.attention_mask.sum(dim=1) - 1


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    device: torch.device,
    max_context: int | None = None,
    field: str = "texts",
) -> TextBatch:
    """Tokenise ``texts`` into one right-padded batch; too long a text is an error naming it."""
    enc = tokenizer(texts, padding=True, return_tensors="pt", padding_side="right")
    mask = enc["attention_mask"]
    if max_context is not None:
        lengths = mask.sum(dim=1)
        too_long = [i for i, n in enumerate(lengths.tolist()) if n > max_context]
        if too_long:
            raise ContextTooLong(
                field, f"texts {too_long} exceed the model's context of {max_context} tokens"
            )
    return TextBatch(input_ids=enc["input_ids"].to(device), attention_mask=mask.to(device))
