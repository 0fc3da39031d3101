"""Several score or trace jobs of one model in one padded forward pass, split back per job.

Each job is first validated and tokenised on its own (:func:`prepare`), with the same
checks its handler makes; a job that fails there is not batched, and fails alone with
its own error. The shared pass right-pads every job's rows to the longest one. With
causal attention and the attention mask, padding never reaches a real token, and the
pad positions a job would have had alone see the same tokens, so a job's rows cut back
to its own padded length hold what its own pass computes (up to the float rounding of
differently shaped matrix products). Each job then gets its own temperature, top-k,
final-token-only, layers, sites, positions and dtype, as :func:`workers.lens.scoring.score`
and :func:`workers.lens.tracing.trace` apply them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol, TypeGuard

import torch

from app.schemas import JobRequest, ScoreJob, TraceJob
from workers.lens import scoring
from workers.lens.errors import InvalidParameter
from workers.lens.loading import DTYPES, LoadedModel
from workers.lens.padding import TextBatch, encode_texts, token_strings
from workers.lens.results import AnalysisResult
from workers.lens.sites import LAYER_SITES, SITES
from workers.lens.tracing import (
    CAPTURABLE_SITES,
    position_index,
    record_sites,
    resolve_layers,
    resolve_sites,
    returned,
    select_positions,
)

BatchableJob = ScoreJob | TraceJob


def batchable(job: JobRequest) -> TypeGuard[BatchableJob]:
    """Score jobs, and trace jobs without gradients (those need a pass of their own)."""
    return isinstance(job, ScoreJob) or (isinstance(job, TraceJob) and job.gradients is None)


@dataclass(frozen=True, eq=False)
class Prepared:
    """One job, validated and tokenised, ready to share a forward pass.

    ``batch`` is the job's own right-padded batch [rows, length] on the model's device;
    for a trace, ``index`` [rows, k] holds the kept positions (``None``: all of them).
    Two are equal only if they are the same object: comparing fields would compare two
    identical jobs' token tensors, which raises.
    """

    job: BatchableJob
    batch: TextBatch
    layers: tuple[int, ...] = ()
    sites: tuple[str, ...] = ()
    index: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.batch.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.batch.input_ids.shape[1]


def prepare(lm: LoadedModel, job: BatchableJob) -> Prepared:
    """Validate and tokenise ``job`` as its handler would; raises what the handler raises."""
    if isinstance(job, ScoreJob):
        t = job.temperature
        if not (math.isfinite(t) and t > 0):
            raise InvalidParameter("temperature", f"must be a finite number > 0, got {t!r}")
        vocab = lm.adapter.vocab_size
        if job.top_k is not None and not 1 <= job.top_k <= vocab:
            raise InvalidParameter("top_k", f"must be an integer in [1, {vocab}], got {job.top_k}")
        return Prepared(job=job, batch=_encode(lm, job))
    layers = resolve_layers(lm.adapter, job.layers)
    sites = resolve_sites(job.sites)
    batch = _encode(lm, job)
    return Prepared(
        job=job,
        batch=batch,
        layers=tuple(layers),
        sites=tuple(sites),
        index=position_index(batch.attention_mask, job.positions),
    )


def _encode(lm: LoadedModel, job: BatchableJob) -> TextBatch:
    return encode_texts(lm.tokenizer, job.text_list(), lm.device, lm.max_context)


class Footprint(Protocol):
    """What a job takes in a shared pass: a prepared job's, or one remembered from it."""

    @property
    def rows(self) -> int: ...

    @property
    def length(self) -> int: ...


def padded_tokens(items: Sequence[Footprint]) -> int:
    """Tokens of the shared pass, padding included: rows × the longest job's length."""
    return sum(i.rows for i in items) * max((i.length for i in items), default=0)


def is_full(items: Sequence[Footprint], budget: int) -> bool:
    """True when not even one more one-token text would fit in ``budget`` tokens."""
    return (sum(i.rows for i in items) + 1) * max((i.length for i in items), default=1) > budget


@dataclass(frozen=True)
class SharedPass:
    """What the shared forward pass produced, for all jobs' rows in order.

    ``logits`` [rows, seq, vocab]; ``captured`` the traced sites [rows, seq, width]
    (the union of the trace jobs' layers and sites; empty for score jobs).
    """

    logits: torch.Tensor
    captured: dict[str, torch.Tensor]


def forward(lm: LoadedModel, items: Sequence[Prepared]) -> SharedPass:
    """Run all ``items`` in one right-padded forward pass."""
    combined = _combine(items, lm.tokenizer.pad_token_id, lm.device)
    traces = [i for i in items if isinstance(i.job, TraceJob)]
    layers = sorted({layer for i in traces for layer in i.layers})
    wanted = {s for i in traces for s in i.sites}
    if "logits" in wanted:
        wanted.add("block_output")
    sites = [s for s in CAPTURABLE_SITES if s in wanted]
    with torch.inference_mode():
        recording: AbstractContextManager[dict[str, torch.Tensor]] = (
            record_sites(lm.adapter, layers, sites) if traces else nullcontext({})
        )
        with recording as captured:
            logits = lm.model(
                input_ids=combined.input_ids, attention_mask=combined.attention_mask
            ).logits
    return SharedPass(logits=logits, captured=captured)


def results(
    lm: LoadedModel, items: Sequence[Prepared], shared: SharedPass
) -> Iterator[AnalysisResult | Exception]:
    """Each job's result in turn (or the error of its own split), as if it had run alone.

    One at a time, so that a caller storing each before taking the next holds at most
    one job's result beside the shared pass.
    """
    start = 0
    for item in items:
        rows = slice(start, start + item.rows)
        start += item.rows
        outcome: AnalysisResult | Exception
        with torch.inference_mode():
            try:
                if isinstance(item.job, ScoreJob):
                    raw = shared.logits[rows, : item.length]
                    outcome = _score_result(lm, item, item.job, raw)
                else:
                    outcome = _trace_result(lm, item, item.job, shared, rows)
            except Exception as exc:  # one job's split failing must not fail the others
                outcome = exc
        yield outcome


def _combine(items: Sequence[Prepared], pad_id: int, device: torch.device) -> TextBatch:
    """All jobs' rows, in order, right-padded to the longest: [sum of rows, max length]."""
    rows, length = sum(i.rows for i in items), max(i.length for i in items)
    if len(items) == 1:
        return items[0].batch
    ids = torch.full((rows, length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((rows, length), dtype=items[0].batch.attention_mask.dtype, device=device)
    start = 0
    for item in items:
        ids[start : start + item.rows, : item.length] = item.batch.input_ids
        mask[start : start + item.rows, : item.length] = item.batch.attention_mask
        start += item.rows
    return TextBatch(input_ids=ids, attention_mask=mask)


def _score_result(
    lm: LoadedModel, item: Prepared, job: ScoreJob, raw: torch.Tensor
) -> AnalysisResult:
    """What ``score`` returns for this job, from its rows of the shared logits
    [rows, length, vocab]."""
    return scoring.from_logits(
        lm,
        item.batch,
        raw,
        temperature=job.temperature,
        final_token_only=job.final_token_only,
        top_k=job.top_k,
    )


def _trace_result(
    lm: LoadedModel,
    item: Prepared,
    job: TraceJob,
    shared: SharedPass,
    rows: slice,
) -> AnalysisResult:
    """What ``trace`` returns for this job, from the shared pass's [all rows, seq, …] tensors.

    As in ``trace``, each layer's logits are projected at the job's own rows and kept
    positions, then cast and moved to the CPU before the next layer's are made."""
    index = item.index

    def keep(t: torch.Tensor) -> torch.Tensor:
        own = t[rows, : item.length]
        return own if index is None else select_positions(own, index)

    out_dtype = DTYPES[job.dtype.value]
    result: dict[str, torch.Tensor] = {}
    for site in item.sites:
        for layer in item.layers if site in LAYER_SITES else [None]:
            name = SITES[site].tensor_name(layer)
            if site == "logits":
                block_output = shared.captured[f"block_output.{layer}"]
                tensor = lm.adapter.unembed(keep(block_output))
            else:
                tensor = keep(shared.captured[name])
            result[name] = returned(tensor, out_dtype)
            del tensor  # so that one layer's logits exist at a time, not two
    result["final_logits"] = returned(keep(shared.logits), torch.float32)
    result["input_ids"] = item.batch.input_ids.cpu()
    result["attention_mask"] = item.batch.attention_mask.cpu()
    if index is not None:
        result["positions"] = index.cpu()
    summary = {
        "layers": list(item.layers),
        "sites": list(item.sites),
        "positions": job.positions,
        "dtype": job.dtype.value,
        "tokens": token_strings(lm.tokenizer, item.batch),
    }
    return AnalysisResult(tensors=result, summary=summary)
