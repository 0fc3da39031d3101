"""Checks at submission that need more than the request alone: the model's shape, limits,
other jobs and data sets. Failing early here beats a job that fails minutes later.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, status

from app.api.errors import field_error
from app.core.config import Limits
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
    """Operator limits on texts, lengths, masks and updates (413 for size, 422 for counts)."""
    for field, texts in _text_fields(job).items():
        if len(texts) > limits.max_texts:
            raise too_large(f"{field}: {len(texts)} texts exceed the limit of {limits.max_texts}")
        longest = max((len(t) for t in texts), default=0)
        if longest > limits.max_text_chars:
            raise too_large(
                f"{field}: a text of {longest} characters exceeds the limit of "
                f"{limits.max_text_chars}"
            )
    if isinstance(job, ChgJob | CchgJob):
        if job.num_masks > limits.max_masks:
            raise invalid("num_masks", f"{job.num_masks} exceeds the limit of {limits.max_masks}")
        updates = job.num_updates + getattr(job, "num_reg_updates", 0)
        if updates > limits.max_updates:
            raise invalid(
                "num_updates", f"{updates} updates in all exceed the limit of {limits.max_updates}"
            )


def _text_fields(job: Request) -> dict[str, list[str]]:
    names = (
        "texts",
        "targets",
        "retain_texts",
        "retain_targets",
        "forget_texts",
        "forget_targets",
        "eval_retain_texts",
        "eval_retain_targets",
        "eval_forget_texts",
        "eval_forget_targets",
        "sentences",
    )
    found: dict[str, list[str]] = {}
    for name in names:
        value = getattr(job, name, None)
        if value is not None:
            found[name] = [value] if isinstance(value, str) else value
    if isinstance(job, AttributeJob):
        found["document"] = [job.document]
    return found


def check_shape(job: Request, info: ModelInfo) -> None:
    """Layer indices and head-mask shapes against the shape GET /v1/models reports."""
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
