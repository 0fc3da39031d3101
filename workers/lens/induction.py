"""Induction scores (Olsson et al. 2022): a check on CHG by a method that uses no gates.

On a sequence whose second half repeats its first, an induction head attends from a
token's repeat to the token that followed its first occurrence, and so predicts it. A
head's induction score is its mean attention probability on that position, over every
repeated token (but the last, whose successor was not repeated) of every sequence. On a
copy task the heads CHG calls facilitating should include the heads with the highest
scores; ``docs/induction.md`` reports the rank correlation with G−.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from workers.lens.errors import InvalidParameter
from workers.lens.loading import LoadedModel


def induction_scores(
    lm: LoadedModel, input_ids: torch.Tensor, first: int, second: int, length: int
) -> torch.Tensor:
    """float32 [layers, heads] induction scores.

    ``input_ids`` [rows, seq] holds, in every row, a block of ``length`` tokens at
    positions ``first …`` repeated at ``second …`` (``second ≥ first + length``): the query
    at ``second + i`` should attend to ``first + i + 1``.
    """
    seq = input_ids.shape[1]
    if length < 2 or first < 0 or second < first + length or second + length > seq:
        raise InvalidParameter(
            "input_ids", f"no repeated block of {length} tokens at {first} and {second}"
        )
    queries = torch.arange(second, second + length - 1)
    keys = torch.arange(first + 1, first + length)
    with torch.inference_mode(), _eager_attention(lm):
        out = lm.model(input_ids=input_ids.to(lm.device), output_attentions=True, use_cache=False)
    scores = [
        attention.float()[:, :, queries, keys].mean(dim=(0, 2)).cpu()
        for attention in out.attentions
    ]
    return torch.stack(scores)


@contextmanager
def _eager_attention(lm: LoadedModel) -> Iterator[None]:
    """transformers returns attention probabilities only from its eager kernel."""
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        lm.model.set_attn_implementation(before)


def rank_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally shaped tensors (ties get mean ranks)."""
    return float(torch.corrcoef(torch.stack([_ranks(x.flatten()), _ranks(y.flatten())]))[0, 1])


def _ranks(values: torch.Tensor) -> torch.Tensor:
    values = values.double()
    order = values.argsort()
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(len(values), dtype=torch.float64)
    for value in values.unique():
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks
