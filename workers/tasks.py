"""The RQ entry point: JSON payload (a job id) in, core call, safetensors blob out.

RQ imports ``run_job`` by dotted path; the worker process installs its
:class:`Runtime` (resident models, stores) before it takes any job.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import save_file

from app.blobstore import BlobStore, blob_metadata
from app.jobstore import JobStore
from app.schemas import JobError, JobKind, JobRequest, JobStatus, TensorInfo
from workers.context import JobContext
from workers.handlers import HANDLERS
from workers.lens.errors import Cancelled, InvalidParameter, LensError
from workers.registry import ModelRegistry

log = logging.getLogger(__name__)
_requests: TypeAdapter[JobRequest] = TypeAdapter(JobRequest)


@dataclass
class Runtime:
    worker_name: str
    registry: ModelRegistry
    store: JobStore
    blobs: BlobStore
    dataset_dir: Path
    result_ttl_s: int


_runtime: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def run_job(job_id: str) -> None:
    """Run one job to a final status; every failure ends in the job record, never in RQ."""
    if _runtime is None:
        raise RuntimeError("run_job needs a lens worker (lens worker), not a plain rq worker")
    rt = _runtime
    if not rt.store.start(job_id, rt.worker_name):
        log.info("job %s: not queued any more (cancelled?), skipped", job_id)
        return
    record = rt.store.get(job_id)
    if record is None:
        return
    doc = record.document
    log.info("job %s: running %s on %s", job_id, doc.kind, doc.model)
    try:
        job = _requests.validate_python({"kind": doc.kind, "model": doc.model, **doc.params})
        ctx = JobContext(
            job_id=job_id,
            owner=record.owner,
            lm=rt.registry.get(doc.model),
            store=rt.store,
            blob_dir=rt.blobs.root,
            dataset_dir=rt.dataset_dir,
        )
        result = HANDLERS[JobKind(doc.kind)](ctx, job)
        tensors = _storable(result.tensors)
        temp = rt.blobs.temp_path(job_id)
        meta = blob_metadata(
            job_id=job_id, kind=doc.kind, model=doc.model, params=doc.params, summary=result.summary
        )
        try:
            save_file(tensors, str(temp), metadata=meta)
            rt.blobs.commit(temp, job_id)
        finally:
            temp.unlink(missing_ok=True)
        info = {
            k: TensorInfo(dtype=str(v.dtype).removeprefix("torch."), shape=list(v.shape))
            for k, v in tensors.items()
        }
        if not rt.store.finish(
            job_id, JobStatus.SUCCEEDED, summary=result.summary, tensors=info, ttl_s=rt.result_ttl_s
        ):
            rt.blobs.delete(job_id)
        log.info("job %s: succeeded", job_id)
    except Cancelled:
        rt.store.finish(job_id, JobStatus.CANCELLED, ttl_s=rt.result_ttl_s)
        log.info("job %s: cancelled", job_id)
    except BaseException as exc:
        _fail(rt, job_id, exc)
        if not isinstance(exc, Exception):
            raise
    finally:
        _free_memory()


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two sharing memory (safetensors refuses aliases, e.g. a
    score that is literally a gate tensor)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def _fail(rt: Runtime, job_id: str, exc: BaseException) -> None:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        error = JobError(type="OutOfMemory", message=f"out of memory: {exc}".strip())
    elif isinstance(exc, InvalidParameter | ValidationError):
        error = JobError(type="InvalidParameter", message=str(exc))
    elif isinstance(exc, LensError):
        error = JobError(type=type(exc).__name__, message=str(exc))
    else:
        error = JobError(type=type(exc).__name__, message=str(exc) or repr(exc))
        log.error("job %s: unexpected error\n%s", job_id, traceback.format_exc())
    rt.store.finish(job_id, JobStatus.FAILED, error=error, ttl_s=rt.result_ttl_s)
    log.info("job %s: failed: %s: %s", job_id, error.type, error.message)


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
