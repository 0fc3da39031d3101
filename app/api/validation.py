"""Checks at submission that need more than the request alone: the model's shape, limits,
other jobs and data sets. Failing early here beats a job that fails minutes later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import HTTPException, status

from app.api.errors import field_error
from app.core import jobsize
from app.core.config import Limits
from app.core.jobsize import dataset_fields as dataset_fields  # the routes' use
from app.core.jobsize import pattern_samples, text_fields
from app.datasets import DatasetSize
from app.jobstore import JobStore
from app.schemas import (
    CchgJob,
    ChgJob,
    JobEstimate,
    JobKind,
    JobRequest,
    JobStatus,
    ModelInfo,
    ScoreJob,
    TraceJob,
)


def invalid(field: str, message: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, field_error(field, message))


def too_large(message: str) -> HTTPException:
    return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, message)


def check_limits(job: JobRequest, limits: Limits) -> None:
    """Operator limits the API can count without a tokenizer (413 for sizes, 422 for
    counts), each reported by its name; token limits come after (:func:`estimate_cost`)."""
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
    if isinstance(job, ScoreJob) and job.top_k is not None and job.top_k > limits.max_top_k:
        raise invalid("top_k", f"{job.top_k} exceeds the limit max_top_k = {limits.max_top_k}")
    if isinstance(job, TraceJob):
        _check_trace_counts(job, limits)
    if isinstance(job, ChgJob) and job.gradient_accum_steps > limits.max_gradient_accum_steps:
        raise invalid(
            "gradient_accum_steps",
            f"{job.gradient_accum_steps} exceeds the limit max_gradient_accum_steps = "
            f"{limits.max_gradient_accum_steps}",
        )
    if isinstance(job, ChgJob | CchgJob):
        seed = job.seed
        if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
            raise invalid("seed", f"must lie in [{SEED_MIN}, {SEED_MAX}], got {seed}")
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


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""The seeds torch's generators take."""


def _check_trace_counts(job: TraceJob, limits: Limits) -> None:
    """Lists that size a trace, each bounded by the tokens a text may have: positions and
    gradient target ids; layers, sites and positions must not repeat."""
    cap = limits.max_tokens_per_text
    if isinstance(job.positions, list):
        _check_indices("positions", job.positions, cap, "max_tokens_per_text", signed=True)
    if job.layers is not None:
        _check_indices("layers", job.layers, None, "", signed=False)
    if job.sites is not None and len(set(job.sites)) != len(job.sites):
        raise invalid("sites", "must not repeat a site")
    grads = job.gradients
    if grads is None:
        return
    if abs(grads.position) >= cap:
        raise invalid(
            "gradients.position",
            f"{grads.position} is beyond any text: the limit max_tokens_per_text is {cap}",
        )
    ids = grads.target_ids or []
    if len(ids) > cap:
        raise invalid(
            "gradients.target_ids",
            f"{len(ids)} ids exceed the limit max_tokens_per_text = {cap}",
        )
    if any(not 0 <= i < 2**63 for i in ids):
        raise invalid("gradients.target_ids", "token ids are integers ≥ 0")


def _check_indices(
    field: str, values: list[int], cap: int | None, limit: str, *, signed: bool
) -> None:
    if len(set(values)) != len(values):
        raise invalid(field, f"must not repeat a {field.rstrip('s')}")
    if not signed and any(v < 0 for v in values):
        raise invalid(field, "indices are integers ≥ 0")
    if cap is None:
        return
    if len(values) > cap:
        raise invalid(field, f"{len(values)} {field} exceed the limit {limit} = {cap}")
    if any(not -cap <= v < cap for v in values):
        raise invalid(field, f"every position lies in [-{cap}, {cap - 1}] ({limit} = {cap})")


def check_dataset(field: str, size: DatasetSize, limits: Limits) -> None:
    """A data set against today's limits (the operator may have lowered them since)."""
    if size.rows > limits.max_texts:
        raise too_large(
            f"{field}: the data set has {size.rows} rows, over the limit max_texts = "
            f"{limits.max_texts}"
        )
    if size.longest_chars > limits.max_text_chars:
        raise too_large(
            f"{field}: a row of {size.longest_chars} characters exceeds the limit "
            f"max_text_chars = {limits.max_text_chars}"
        )


def check_fit_rows(job: JobRequest, datasets: dict[str, DatasetSize], limits: Limits) -> None:
    """Rows a gate fit plans up front (updates × accumulation × batch), as a list and a
    tensor, before its first step."""
    if isinstance(job, ChgJob):
        prompts = job.num_samples if job.pattern is not None else len(job.texts or [])
        prompts = datasets["dataset"].rows if "dataset" in datasets else prompts
    elif isinstance(job, CchgJob):
        retain = datasets.get("retain_dataset")
        prompts = retain.rows if retain is not None else len(job.retain_texts or [])
    else:
        return
    rows = jobsize.fit_rows(job, prompts)
    if rows is not None and rows > limits.max_fit_rows:
        accum = getattr(job, "gradient_accum_steps", 1)
        raise invalid(
            "num_updates",
            f"the fit would draw {rows} prompt rows (updates × gradient_accum_steps "
            f"{accum} × min(batch_size, prompts)), over the limit max_fit_rows = "
            f"{limits.max_fit_rows}: lower num_updates, gradient_accum_steps or batch_size",
        )


def estimate_cost(
    job: JobRequest,
    info: ModelInfo,
    limits: Limits,
    datasets: dict[str, DatasetSize],
    dataset_dir: Path,
    encode: jobsize.Encode | None,
) -> JobEstimate | None:
    """Count the job's tokens (413 over a token limit), then estimate its result's size
    and peak memory from the model's shape (413 naming the estimate and what to lower);
    None before any worker published the shape. ``encode``: the model's published
    tokenizer (:mod:`app.tokens`), which counts as the worker will; without one, tokens
    are guessed from the texts' bytes and the worker estimates again from the real
    counts before it computes anything."""
    tokens = _counted(job, limits, dataset_dir, encode) if encode is not None else {}
    shape = jobsize.ModelShape.of(info)
    if shape is None:
        return None
    # A data set whose file expired since its record was read is guessed (the worker
    # refuses the job anyway).
    guessed = encode is None or any(f"{field}.prompt" not in tokens for field in datasets)
    if guessed:
        cap = min(limits.max_tokens_per_text, shape.max_context or limits.max_tokens_per_text)
        tokens = jobsize.guessed_tokens(job, cap, datasets) | tokens
    try:
        cost = jobsize.check_cost(job, shape, tokens, limits, guessed=guessed)
    except jobsize.JobTooLarge as exc:
        raise too_large(str(exc)) from None
    return JobEstimate(
        result_bytes=cost.result_bytes,
        peak_bytes=cost.peak_bytes,
        tokens="guessed" if guessed else "counted",
    )


def _counted(
    job: JobRequest, limits: Limits, dataset_dir: Path, encode: jobsize.Encode
) -> dict[str, list[int]]:
    try:
        return jobsize.count_tokens(job, encode, limits, dataset_dir)
    except jobsize.TokenLimitExceeded as exc:
        raise too_large(f"{exc.field}: {exc}") from None


def check_shape(job: JobRequest, info: ModelInfo) -> None:
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
    for field in ("head_mask", "facilitating_mask"):
        mask = getattr(job, field, None)
        if mask is not None and (len(mask) != layers or len(mask[0]) != heads):
            raise invalid(
                field,
                f"shape [{len(mask)}, {len(mask[0])}] does not match model {info.name!r}: "
                f"[layers, heads] = [{layers}, {heads}]",
            )


def check_source_job(job: JobRequest, owner: str, store: JobStore) -> None:
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


def public_params(job: JobRequest) -> dict[str, Any]:
    """The parameters as stored and echoed back (``kind`` and ``model`` live beside them)."""
    return job.model_dump(mode="json", exclude={"kind", "model"})
