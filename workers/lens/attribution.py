"""Sentence attribution: which document sentences a summary leans on, through a head circuit.

The model reads ``document + separator + summary`` (one string, tokenised once,
so the tokens are those the model would see for that text) with a head mask
applied. The gradient of the summary tokens' total log-likelihood w.r.t. the
input embeddings scores every document-side token by its L2 norm, and a
sentence's score aggregates its tokens' norms.

Tokens are tied to sentences by character offsets from the tokenizer, never by
re-tokenising sentences, so repeated sentences and sentences next to
punctuation map exactly. A token belongs to the sentence it shares most
characters with; one that covers no character by its offsets (special tokens,
whitespace that the tokenizer trims to an empty span) belongs to none.

Token sides: a token holding any summary character is a summary token (its
log-probability enters the loss); every token before the first summary token is
a document-side token (special tokens such as BOS and a token made only of the
separator included, mapped to no sentence); special tokens after the summary
(an appended EOS) are dropped.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch.utils.checkpoint import checkpoint

from workers.lens.adapters import ModelAdapter
from workers.lens.errors import ContextTooLong, InvalidParameter
from workers.lens.gating import head_gates
from workers.lens.loading import LoadedModel
from workers.lens.results import AnalysisResult

Aggregate = Literal["mean", "sum", "max"]
AGGREGATES: tuple[str, ...] = ("mean", "sum", "max")
DEFAULT_SEPARATOR = " "
DEFAULT_CHECKPOINT_ABOVE = 512
"""Inputs of at least this many tokens recompute block activations during the backward pass."""
MASK_FIELD = "facilitating_mask"


@dataclass(frozen=True)
class Tokenized:
    """The joined text's tokens and where the summary starts.

    ``input_ids`` [seq] ends with the last summary token; tokens
    ``[0, summary_start)`` are document-side, ``[summary_start, seq)`` the summary.
    ``offsets`` holds the document-side tokens' ``(start, end)`` character spans.
    """

    input_ids: torch.Tensor
    offsets: list[tuple[int, int]]
    summary_start: int


@torch.inference_mode(False)
def attribute(
    lm: LoadedModel,
    document: str,
    sentences: list[str],
    summary: str,
    head_mask: torch.Tensor,
    *,
    aggregate: Aggregate = "mean",
    separator: str = DEFAULT_SEPARATOR,
    checkpoint_above: int = DEFAULT_CHECKPOINT_ABOVE,
) -> AnalysisResult:
    """Score each sentence of ``document`` by the gradient of ``summary``'s log-likelihood.

    ``head_mask`` [layers, heads] in [0, 1] scales each head's output (before
    W_O) during the forward and backward pass. Tensors: ``token_grad_norms``
    [doc_tokens] float32, ``token_sentence`` [doc_tokens] int64 (sentence index,
    -1 for tokens in no sentence), ``sentence_scores`` [sentences] float32 (NaN
    for a sentence that owns no token) and ``input_ids`` [seq] int64 (the whole
    input, document side then summary). Summary: ``scores`` (one per sentence,
    in order; ``None`` where the sentence owns no token), ``sentence_tokens``,
    token counts, the summary's log-likelihood and the conventions used.
    """
    mask = _check_inputs(lm.adapter, document, sentences, summary, head_mask, aggregate)
    spans = sentence_spans(document, sentences)
    tok = tokenize_joined(lm, document, summary, separator)
    token_sentence = map_tokens(tok.offsets, spans)
    checkpointed = tok.input_ids.numel() >= checkpoint_above
    log_likelihood, embed_grad = _summary_gradient(lm, tok, mask, checkpointed)
    norms = embed_grad[: tok.summary_start].float().norm(dim=-1).cpu()
    scores = [_aggregate(norms[token_sentence == i], aggregate) for i in range(len(sentences))]
    counts = [int((token_sentence == i).sum()) for i in range(len(sentences))]
    return AnalysisResult(
        tensors={
            "token_grad_norms": norms,
            "token_sentence": token_sentence,
            "sentence_scores": torch.tensor(
                [math.nan if s is None else s for s in scores], dtype=torch.float32
            ),
            "input_ids": tok.input_ids.cpu(),
        },
        summary={
            "scores": scores,
            "sentence_tokens": counts,
            "aggregate": aggregate,
            "document_tokens": tok.summary_start,
            "summary_tokens": tok.input_ids.numel() - tok.summary_start,
            "summary_log_likelihood": log_likelihood,
            "separator": separator,
            "checkpointed": checkpointed,
        },
    )


def _check_inputs(
    adapter: ModelAdapter,
    document: str,
    sentences: list[str],
    summary: str,
    head_mask: torch.Tensor,
    aggregate: str,
) -> torch.Tensor:
    if not document:
        raise InvalidParameter("document", "must not be empty")
    if not summary.strip():
        raise InvalidParameter("summary", "must not be empty")
    if not sentences:
        raise InvalidParameter("sentences", "must list at least one sentence")
    empty = [i for i, s in enumerate(sentences) if not s.strip()]
    if empty:
        raise InvalidParameter("sentences", f"sentences {empty} are empty")
    if aggregate not in AGGREGATES:
        raise InvalidParameter("aggregate", f"must be one of {list(AGGREGATES)}, got {aggregate!r}")
    expected = [adapter.num_layers, adapter.num_heads]
    if list(head_mask.shape) != expected:
        raise InvalidParameter(
            MASK_FIELD, f"must be [layers, heads] = {expected}, got {list(head_mask.shape)}"
        )
    # A copy: the caller's tensor may be an inference tensor, which autograd cannot save.
    mask = head_mask.detach().to(torch.float32, copy=True)
    if not bool(((mask >= 0) & (mask <= 1)).all()):
        raise InvalidParameter(MASK_FIELD, "every gate must lie in [0, 1]")
    return mask


def sentence_spans(document: str, sentences: list[str]) -> list[tuple[int, int]]:
    """Each sentence's ``(start, end)`` character span, searched from the previous one's end."""
    spans = []
    cursor = 0
    for i, sentence in enumerate(sentences):
        start = document.find(sentence, cursor)
        if start < 0:
            where = "the document" if cursor == 0 else f"the document after character {cursor}"
            raise InvalidParameter(
                "sentences", f"sentence {i} ({_preview(sentence)}) is not in {where}"
            )
        cursor = start + len(sentence)
        spans.append((start, cursor))
    return spans


def _preview(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def tokenize_joined(lm: LoadedModel, document: str, summary: str, separator: str) -> Tokenized:
    """Tokenise ``document + separator + summary`` once, with character offsets."""
    if not lm.tokenizer.is_fast:
        raise InvalidParameter(
            "model", "its tokenizer gives no character offsets (not a fast tokenizer)"
        )
    enc = lm.tokenizer(
        document + separator + summary, return_offsets_mapping=True, add_special_tokens=True
    )
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    summary_char = len(document) + len(separator)
    in_summary = [i for i, (_, end) in enumerate(offsets) if end > summary_char]
    if not in_summary:
        raise InvalidParameter("summary", "tokenises to no tokens")
    first, last = in_summary[0], in_summary[-1]
    if first == 0:
        raise InvalidParameter("document", "no token precedes the summary")
    length = last + 1
    if lm.max_context is not None and length > lm.max_context:
        raise ContextTooLong(
            "document",
            f"document and summary take {length} tokens; the model's context is "
            f"{lm.max_context} tokens",
        )
    return Tokenized(
        input_ids=torch.tensor(enc["input_ids"][:length], dtype=torch.long),
        offsets=offsets[:first],
        summary_start=first,
    )


def map_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> torch.Tensor:
    """[tokens] int64: the sentence sharing most characters with each token, -1 for none.

    Spans are sorted and disjoint (see :func:`sentence_spans`); ties go to the
    earlier sentence.
    """
    owner = []
    first = 0
    for start, end in offsets:
        while first < len(spans) and spans[first][1] <= start:
            first += 1
        best, best_overlap = -1, 0
        j = first
        while j < len(spans) and spans[j][0] < end:
            overlap = min(end, spans[j][1]) - max(start, spans[j][0])
            if overlap > best_overlap:
                best, best_overlap = j, overlap
            j += 1
        owner.append(best)
    return torch.tensor(owner, dtype=torch.long)


def _summary_gradient(
    lm: LoadedModel, tok: Tokenized, mask: torch.Tensor, checkpointed: bool
) -> tuple[float, torch.Tensor]:
    """The summary's total log-likelihood and its gradient w.r.t. the input embeddings.

    The gradient is [seq, hidden], in the model's dtype.
    """
    model = lm.model
    ids = tok.input_ids.to(lm.device).unsqueeze(0)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    n_summary = ids.shape[1] - tok.summary_start
    kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(ids), "use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = n_summary + 1
    with (
        torch.enable_grad(),
        head_gates(lm.adapter, mask.to(lm.device)),
        _checkpointed_blocks(lm.adapter, enabled=checkpointed),
    ):
        logits = model(inputs_embeds=embeds, **kwargs).logits[0, -(n_summary + 1) : -1]
        targets = ids[0, tok.summary_start :]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        log_likelihood = log_probs.gather(-1, targets.unsqueeze(-1)).sum()
        (grad,) = torch.autograd.grad(log_likelihood, embeds)
    return float(log_likelihood.detach()), grad[0]


@contextmanager
def _checkpointed_blocks(adapter: ModelAdapter, *, enabled: bool) -> Iterator[None]:
    """Recompute each block's activations in the backward pass instead of keeping them.

    transformers' own ``gradient_checkpointing_enable`` only acts on modules in
    training mode (and leaves an input-embedding hook behind), while resident
    models stay in eval mode; wrapping each block's ``forward`` on the instance
    checkpoints any adapted model and is undone exactly on exit.
    """
    if not enabled:
        yield
        return
    saved: list[tuple[torch.nn.Module, Callable[..., Any] | None]] = []
    try:
        for parts in adapter.blocks:
            block = parts.block
            saved.append((block, block.__dict__.get("forward")))
            block.forward = partial(_checkpoint_call, block.forward)
        yield
    finally:
        for block, own in reversed(saved):
            if own is None:
                del block.forward
            else:
                block.forward = own


def _checkpoint_call(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _aggregate(values: torch.Tensor, how: str) -> float | None:
    if values.numel() == 0:
        return None
    if how == "sum":
        return float(values.sum())
    if how == "max":
        return float(values.max())
    return float(values.mean())
