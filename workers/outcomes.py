"""How a job ends in its record: the result blob written and the job marked succeeded,
or its failure recorded as plain data (type and message), retrying while Redis is away."""

from __future__ import annotations

import gc
import logging
import traceback

import torch
from pydantic import ValidationError

from app.blobstore import BlobTensor, blob_metadata
from app.schemas import JobDocument, JobError, JobStatus, TensorInfo
from workers import limits
from workers.context import until_redis_answers
from workers.lens.errors import InvalidParameter, LensError
from workers.lens.results import AnalysisResult
from workers.runtime import Runtime

log = logging.getLogger(__name__)


def deliver(rt: Runtime, doc: JobDocument, result: AnalysisResult) -> None:
    """Write this attempt's blob atomically, then mark the job succeeded, retrying while
    Redis is away; if the job ended meanwhile or is no longer this attempt's, drop this
    attempt's blob (never another's)."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in result.tensors.items()}
    limits.check_result_size(tensors, rt.limits)
    meta = blob_metadata(
        job_id=doc.id, kind=doc.kind, model=doc.model, params=doc.params, summary=result.summary
    )
    blob = {name: blob_tensor(t) for name, t in tensors.items()}
    rt.blobs.write(doc.id, blob, meta, attempt=doc.retries)
    info = {k: TensorInfo(dtype=v.dtype, shape=list(v.shape)) for k, v in blob.items()}
    if until_redis_answers(
        lambda: rt.store.finish(
            doc.id, JobStatus.SUCCEEDED, summary=result.summary, tensors=info, ttl_s=rt.result_ttl_s
        ),
        f"job {doc.id}: succeeded",
    ):
        log.info("job %s: succeeded", doc.id)
        return
    rt.blobs.delete(doc.id, attempt=doc.retries)
    log.warning("job %s: finished, but it had ended or been given to another run", doc.id)


def blob_tensor(tensor: torch.Tensor) -> BlobTensor:
    """The file's view of a CPU, contiguous tensor: its own memory, not a copy."""
    data = tensor.reshape(-1).view(torch.uint8).numpy().data
    dtype = str(tensor.dtype).removeprefix("torch.")
    return BlobTensor(dtype=dtype, shape=tuple(tensor.shape), data=data)


def fail(rt: Runtime, job_id: str, exc: BaseException) -> None:
    """Record the job's failure, retrying while Redis is away."""
    if limits.is_out_of_memory(exc):
        record = until_redis_answers(lambda: rt.store.get(job_id), f"job {job_id}: failure")
        kind, params = (record.document.kind, record.document.params) if record else ("job", {})
        error = JobError(
            type="OutOfMemory", message=limits.out_of_memory_message(kind, params, exc)
        )
    elif isinstance(exc, InvalidParameter | ValidationError):
        error = JobError(type="InvalidParameter", message=str(exc))
    elif isinstance(exc, LensError):
        error = JobError(type=type(exc).__name__, message=str(exc))
    else:
        error = JobError(type=type(exc).__name__, message=str(exc) or repr(exc))
        log.error("job %s: unexpected error\n%s", job_id, traceback.format_exc())
    until_redis_answers(
        lambda: rt.store.finish(job_id, JobStatus.FAILED, error=error, ttl_s=rt.result_ttl_s),
        f"job {job_id}: failure",
    )
    log.info("job %s: failed: %s: %s", job_id, error.type, error.message)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
