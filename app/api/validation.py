"""Checks at submission that need more than the request alone: the model's shape, limits,
other jobs and data sets. Failing early here beats a job that fails minutes later.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, status

from app.api.errors import field_error
from app.core.config import Limits
from app.core.jobsize import pattern_samples, text_fields
from app.jobstore import JobStore
from app.schemas import (
    AblateJob,
    AttributeJob,
    CchgJob,
    ChgJob,
    JobKind,
    JobStatus,
    ModelInfo,
    ScoreJob,
    TraceJob,
)

Request = ScoreJob | TraceJob | ChgJob | AblateJob | CchgJob | AttributeJob


def invalid(field: str, message: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, field_error(field, message))


def too_large(message: str) -> HTTPException:
    return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, message)


def check_limits(job: Request, limits: Limits) -> None:
    """Operator limits the API can count (413 for sizes, 422 for counts), each reported by
    its name; token counts are the worker's (it has the tokenizer)."""
    for field, texts in text_fields(job).items():
        if len(texts) > limits.max_texts:
            raise too_large(
                f"{field}: {len(texts)} texts exceed the limit max_texts = {limits.max_texts}"
            )
        longest = max((len(t) for t in texts), default=0)
        if longest > limits.max_text_chars:
            raise too_large(
                f"{field}: a text of {longest} characters exceeds the limit max_text_chars = "
                f"{limits.max_text_chars}"
            )
    samples = pattern_samples(job)
    if samples is not None and samples > limits.max_texts:
        raise invalid("num_samples", f"{samples} exceeds the limit max_texts = {limits.max_texts}")
    if isinstance(job, ChgJob | CchgJob):
        if job.num_masks > limits.max_masks:
            raise invalid(
                "num_masks", f"{job.num_masks} exceeds the limit max_masks = {limits.max_masks}"
            )
        product = job.num_masks * job.batch_size
        if product > limits.max_mask_batch:
            raise invalid(
                "batch_size",
                f"num_masks × batch_size = {job.num_masks} × {job.batch_size} = {product} "
                f"exceeds the limit max_mask_batch = {limits.max_mask_batch}",
            )
        updates = job.num_updates + getattr(job, "num_reg_updates", 0)
        if updates > limits.max_updates:
            raise invalid(
                "num_updates",
                f"{updates} updates in all exceed the limit max_updates = {limits.max_updates}",
            )


def check_dataset_rows(field: str, rows: int, limits: Limits) -> None:
    if rows > limits.max_texts:
        raise too_large(
            f"{field}: the data set has {rows} rows, over the limit max_texts = {limits.max_texts}"
        )


def check_shape(job: Request, info: ModelInfo) -> None:
    """Layer indices, head-mask shapes, ``top_k`` and gradient target ids against the
    shape GET /v1/models reports."""
    vocab = info.vocab_size
    if isinstance(job, ScoreJob) and job.top_k is not None and vocab and job.top_k > vocab:
        raise invalid(
            "top_k", f"{job.top_k} exceeds the vocabulary of model {info.name!r} ({vocab})"
        )
    ids = job.gradients.target_ids if isinstance(job, TraceJob) and job.gradients else None
    if ids and vocab and (bad_ids := [i for i in ids if not 0 <= i < vocab]):
        raise invalid(
            "gradients.target_ids",
            f"{bad_ids} are not token ids of model {info.name!r} (vocabulary {vocab})",
        )
    layers, heads = info.layers, info.heads
    if layers is None or heads is None:
        return
    if isinstance(job, TraceJob) and job.layers is not None:
        bad = [i for i in job.layers if not 0 <= i < layers]
        if bad:
            raise invalid(
                "layers", f"{bad} out of range: model {info.name!r} has layers 0..{layers - 1}"
            )
        if len(set(job.layers)) != len(job.layers):
            raise invalid("layers", "must not repeat a layer")
    mask_field = {"head_mask": "head_mask", "facilitating_mask": "facilitating_mask"}
    for field in mask_field:
        mask = getattr(job, field, None)
        if mask is not None and (len(mask) != layers or len(mask[0]) != heads):
            raise invalid(
                field,
                f"shape [{len(mask)}, {len(mask[0])}] does not match model {info.name!r}: "
                f"[layers, heads] = [{layers}, {heads}]",
            )


def check_source_job(job: Request, owner: str, store: JobStore) -> None:
    """``from_job`` must name a succeeded chg job of the same caller and model."""
    from_job = getattr(job, "from_job", None)
    if from_job is None:
        return
    record = store.get(from_job)
    if record is None or record.owner != owner:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"from_job: job {from_job!r} not found")
    doc = record.document
    if doc.kind is not JobKind.CHG:
        raise invalid("from_job", f"job {from_job!r} is a {doc.kind} job, not a chg job")
    if doc.model != job.model:
        raise invalid("from_job", f"job {from_job!r} ran on model {doc.model!r}, not {job.model!r}")
    if doc.status is not JobStatus.SUCCEEDED:
        raise invalid("from_job", f"job {from_job!r} is {doc.status}, not succeeded")


def dataset_fields(job: Request) -> dict[str, str]:
    names = ("dataset", "retain_dataset", "forget_dataset")
    return {n: v for n in names if (v := getattr(job, n, None)) is not None}


def public_params(job: Request) -> dict[str, Any]:
    """The parameters as stored and echoed back (``kind`` and ``model`` live beside them)."""
    return job.model_dump(mode="json", exclude={"kind", "model"})
