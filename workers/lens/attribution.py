"""Sentence attribution: which document sentences a summary leans on, through a head circuit.

The model reads the document followed by the summary, with a head mask applied. The
gradient of the summary's log-likelihood w.r.t. the input embeddings scores every
document-side token by its L2 norm, and a sentence's score aggregates its tokens' norms.

Defaults follow the seed library's ``CausalCircuitAttribution``: the loss is the
summary's mean token NLL (``loss="mean"``; ``"sum"``, the total, scales every norm by the
summary's length) and sentence scores are divided by their largest (``normalize="max"``;
``"none"`` keeps the raw aggregates). What still differs from the seed, on purpose: the
summary is joined to the document as a target to its prompt (``target_join``, see
``workers.lens.prompt_targets``): by default tokenised apart from it, as the seed does, but with one
leading space (the seed tokenises the summary bare, so ``"Paris …"`` becomes a word-piece
the model rarely sees after a document); the head mask is applied exactly as in the gate
fits; and tokens map to sentences by character offsets, not by re-tokenising sentences.
The summary's NLL is reported with all heads on and through the circuit, so an
attribution through a circuit that no longer predicts the summary can be told apart.

Tokens are tied to sentences by character offsets from the tokenizer, never by
re-tokenising sentences, so repeated sentences and sentences next to
punctuation map exactly. A token belongs to the sentence it shares most
characters with; one that covers no character by its offsets (special tokens,
whitespace that the tokenizer trims to an empty span) belongs to none.

Token sides, under ``target_join="raw"`` (``document + separator + summary`` tokenised
once): a token holding any summary character is a summary token (its log-probability
enters the loss); every token before the first summary token is a document-side token
(special tokens such as BOS and a token made only of the separator included, mapped to
no sentence); special tokens after the summary (an appended EOS) are dropped.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from workers.lens.adapters import ModelAdapter
from workers.lens.checkpointing import DEFAULT_CHECKPOINT_ABOVE, checkpointed_blocks
from workers.lens.errors import ContextTooLong, InvalidParameter
from workers.lens.gated_forward import fp32_lm_head
from workers.lens.gating import head_gates
from workers.lens.loading import LoadedModel
from workers.lens.prompt_targets import TARGET_JOINS, join_with_space
from workers.lens.results import AnalysisResult

Aggregate = Literal["mean", "sum", "max"]
AGGREGATES: tuple[str, ...] = ("mean", "sum", "max")
NORMALIZE: tuple[str, ...] = ("max", "none")
LOSSES: tuple[str, ...] = ("mean", "sum")
DEFAULT_SEPARATOR = " "
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
    target_join: str = "space",
    normalize: str = "max",
    loss: str = "mean",
    separator: str = DEFAULT_SEPARATOR,
    checkpoint_above: int = DEFAULT_CHECKPOINT_ABOVE,
) -> AnalysisResult:
    """Score each sentence of ``document`` by the gradient of ``summary``'s log-likelihood.

    ``head_mask`` [layers, heads] in [0, 1] scales each head's output (before
    W_O) during the forward and backward pass. ``separator`` joins document and summary
    under ``target_join="raw"`` only. Tensors: ``token_grad_norms`` [doc_tokens] float32
    (of the ``loss``), ``token_sentence`` [doc_tokens] int64 (sentence index, -1 for
    tokens in no sentence), ``sentence_scores`` [sentences] float32 (NaN for a sentence
    that owns no token; normalised as ``normalize`` says) and ``input_ids`` [seq] int64
    (the whole input, document side then summary). Summary: ``scores`` (one per sentence,
    in order; ``None`` where the sentence owns no token), ``sentence_tokens``, token
    counts, the summary's log-likelihood and mean NLL (``summary_nll``: with all heads on
    and through the circuit) and the conventions used.
    """
    mask = _check_inputs(lm.adapter, document, sentences, summary, head_mask, aggregate)
    _check_choice("target_join", target_join, TARGET_JOINS)
    _check_choice("normalize", normalize, NORMALIZE)
    _check_choice("loss", loss, LOSSES)
    spans = sentence_spans(document, sentences)
    if target_join == "space":
        tok = tokenize_apart(lm, document, summary)
    else:
        tok = tokenize_joined(lm, document, summary, separator)
    token_sentence = map_tokens(tok.offsets, spans)
    checkpointed = tok.input_ids.numel() >= checkpoint_above
    log_likelihood, embed_grad = _summary_gradient(lm, tok, mask, checkpointed, loss)
    n_summary = tok.input_ids.numel() - tok.summary_start
    norms = embed_grad[: tok.summary_start].float().norm(dim=-1).cpu()
    raw = [_aggregate(norms[token_sentence == i], aggregate) for i in range(len(sentences))]
    scores = _normalized(raw) if normalize == "max" else raw
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
            "summary_tokens": n_summary,
            "summary_log_likelihood": log_likelihood,
            "summary_nll": {
                "all_heads": _all_heads_nll(lm, tok),
                "circuit": -log_likelihood / n_summary,
            },
            "target_join": target_join,
            "normalize": normalize,
            "loss": loss,
            "separator": separator if target_join == "raw" else None,
            "checkpointed": checkpointed,
        },
    )


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidParameter(field, f"must be one of {list(allowed)}, got {value!r}")


def _normalized(scores: list[float | None]) -> list[float | None]:
    """Scores divided by the largest one, when it is positive (the seed's normalisation)."""
    largest = max((s for s in scores if s is not None and math.isfinite(s)), default=0.0)
    if largest <= 0:
        return scores
    return [None if s is None else s / largest for s in scores]


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


def tokenize_apart(lm: LoadedModel, document: str, summary: str) -> Tokenized:
    """The ``"space"`` join: the document (less trailing whitespace, with the tokenizer's
    special tokens, less any it appends) and the summary (one leading space unless it
    starts with whitespace, no special tokens), tokenised apart."""
    if not lm.tokenizer.is_fast:
        raise InvalidParameter(
            "model", "its tokenizer gives no character offsets (not a fast tokenizer)"
        )
    (doc,), (joined,) = join_with_space([document], [summary])
    enc = lm.tokenizer(doc, return_offsets_mapping=True, add_special_tokens=True)
    appended = set(lm.tokenizer.all_special_ids) - {lm.tokenizer.unk_token_id}
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    while ids and ids[-1] in appended and offsets[-1] == (0, 0):
        ids.pop()
        offsets.pop()
    summary_ids = lm.tokenizer(joined, add_special_tokens=False)["input_ids"]
    if not summary_ids:
        raise InvalidParameter("summary", "tokenises to no tokens")
    if not ids:
        raise InvalidParameter("document", "no token precedes the summary")
    length = len(ids) + len(summary_ids)
    if lm.max_context is not None and length > lm.max_context:
        raise ContextTooLong(
            "document",
            f"document and summary take {length} tokens; the model's context is "
            f"{lm.max_context} tokens",
        )
    return Tokenized(
        input_ids=torch.tensor(ids + summary_ids, dtype=torch.long),
        offsets=offsets,
        summary_start=len(ids),
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
    lm: LoadedModel, tok: Tokenized, mask: torch.Tensor, checkpointed: bool, loss: str
) -> tuple[float, torch.Tensor]:
    """The summary's total log-likelihood and the gradient w.r.t. the input embeddings
    of its total (``loss="sum"``) or mean per token (``"mean"``).

    The gradient is [seq, hidden], in the model's dtype.
    """
    model = lm.model
    ids = tok.input_ids.to(lm.device).unsqueeze(0)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    n_summary = ids.shape[1] - tok.summary_start
    with (
        torch.enable_grad(),
        head_gates(lm.adapter, mask.to(lm.device)),
        checkpointed_blocks(lm.adapter, enabled=checkpointed),
        fp32_lm_head(lm.adapter),
    ):
        token_logp = _summary_log_probs(lm, tok, ids, inputs_embeds=embeds)
        log_likelihood = token_logp.sum()
        objective = log_likelihood if loss == "sum" else log_likelihood / n_summary
        (grad,) = torch.autograd.grad(objective, embeds)
    return float(log_likelihood.detach()), grad[0]


def _summary_log_probs(
    lm: LoadedModel, tok: Tokenized, ids: torch.Tensor, **inputs: torch.Tensor
) -> torch.Tensor:
    """[summary tokens] log-probability of each summary token, from the fp32 LM head."""
    model = lm.model
    n_summary = ids.shape[1] - tok.summary_start
    kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(ids), "use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = n_summary + 1
    logits = model(**inputs, **kwargs).logits[0, -(n_summary + 1) : -1]
    targets = ids[0, tok.summary_start :]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1))[:, 0]


def _all_heads_nll(lm: LoadedModel, tok: Tokenized) -> float:
    """The summary's mean token NLL with every head on."""
    ids = tok.input_ids.to(lm.device).unsqueeze(0)
    with torch.inference_mode(), fp32_lm_head(lm.adapter):
        return float(-_summary_log_probs(lm, tok, ids, input_ids=ids).mean())


def _aggregate(values: torch.Tensor, how: str) -> float | None:
    if values.numel() == 0:
        return None
    if how == "sum":
        return float(values.sum())
    if how == "max":
        return float(values.max())
    return float(values.mean())
