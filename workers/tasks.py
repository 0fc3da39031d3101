"""The RQ entry point: JSON payload (a job id) in, core call, safetensors blob out.

RQ imports ``run_job`` by dotted path; the worker process installs its
:class:`Runtime` (resident models, stores) before it takes any job.

A score or trace job also takes the jobs of its kind queued behind it for the same
model, up to the model's token budget, and runs them all in one padded forward pass
(:mod:`workers.claim`, :mod:`workers.batcher`). If the API is still taking jobs of that
kind for the model when such a job starts (a burst), it first waits for them to be
queued, up to ``ModelSpec.batch_wait_ms``. A running chg, cchg or ablate job serves the
model's queued score and trace jobs the same way between two of its steps
(:mod:`workers.fit_pauses`).
"""

from __future__ import annotations

import gc
import logging
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from app.blobstore import BlobStore, BlobTensor, blob_metadata
from app.core.config import Limits
from app.jobstore import JobStore
from app.schemas import JobDocument, JobError, JobKind, JobStatus, TensorInfo
from workers import batcher, limits
from workers.claim import SHORT_KINDS, Claimer, Member, parse, prepare
from workers.context import JobContext, until_redis_answers
from workers.fit_pauses import FIT_KINDS, FitPauses
from workers.handlers import HANDLERS
from workers.lens.errors import Cancelled, InvalidParameter, LensError
from workers.lens.loading import LoadedModel
from workers.lens.results import AnalysisResult
from workers.registry import ModelRegistry

log = logging.getLogger(__name__)


@dataclass
class BatchStats:
    """Shared forward passes of score and trace jobs, for the worker's heartbeat."""

    passes: int = 0
    jobs: int = 0
    batched_jobs: int = 0
    largest: int = 0
    in_fit_pauses: int = 0
    """Jobs run by a fit's pauses (:mod:`workers.fit_pauses`)."""

    def record(self, jobs: int) -> None:
        self.passes += 1
        self.jobs += jobs
        self.batched_jobs += jobs if jobs > 1 else 0
        self.largest = max(self.largest, jobs)


@dataclass
class Runtime:
    worker_name: str
    registry: ModelRegistry
    store: JobStore
    blobs: BlobStore
    dataset_dir: Path
    result_ttl_s: int
    batching: BatchStats = field(default_factory=BatchStats)
    limits: Limits = field(default_factory=Limits)
    claims: Claimer = field(init=False)

    def __post_init__(self) -> None:
        self.claims = Claimer(self.worker_name, self.store, self.limits, self.dataset_dir)


_runtime: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def stats() -> dict[str, Any]:
    """What the heartbeat exports: ``batching`` (BatchStats), ``registry`` (its stats())
    and ``holding`` (the jobs this worker runs, for the reaper)."""
    if _runtime is None:
        return {}
    return {
        "batching": asdict(_runtime.batching),
        "registry": _runtime.registry.stats(),
        "holding": _runtime.store.holding(),
    }


def run_job(job_id: str) -> None:
    """Run one job (and the jobs batched with it) to a final status; every failure ends
    in the job record, never in RQ."""
    if _runtime is None:
        raise RuntimeError("run_job needs a lens worker (lens worker), not a plain rq worker")
    rt = _runtime
    record = rt.store.start(job_id, rt.worker_name)
    if record is None:
        log.info("job %s: not queued any more (cancelled?), skipped", job_id)
        return
    doc = record.document
    log.info("job %s: running %s on %s", job_id, doc.kind, doc.model)
    try:
        job = parse(doc)
        lm = rt.registry.get(doc.model)
        leader = prepare(lm, job)
        rt.claims.check_tokens(lm, job, leader)
        if leader is not None:
            spec = rt.registry.specs[doc.model]
            head = rt.claims.await_submissions(spec, doc, leader)
            companions = rt.claims.take(
                lm, doc.model, {doc.kind}, [leader], spec.max_batch_tokens, head
            )
            for member in companions:
                log.info(
                    "job %s: running %s on %s, batched with %s",
                    member.doc.id, doc.kind, doc.model, doc.id,
                )  # fmt: skip
            _run_shared(rt, lm, [Member(doc, leader), *companions])
            return
        pauses = _fit_pauses(rt, lm, doc)
        ctx = JobContext(
            job_id=job_id,
            owner=record.owner,
            lm=lm,
            store=rt.store,
            blob_dir=rt.blobs.root,
            dataset_dir=rt.dataset_dir,
            between_steps=pauses,
        )
        result = HANDLERS[JobKind(doc.kind)](ctx, job)
        if pauses is not None:
            result.summary["pauses"] = pauses.log.summary()
        _deliver(rt, doc, result)
        return
    except Cancelled:
        until_redis_answers(
            lambda: rt.store.finish(job_id, JobStatus.CANCELLED, ttl_s=rt.result_ttl_s),
            f"job {job_id}: cancelled",
        )
        log.info("job %s: cancelled", job_id)
    except BaseException as exc:
        _fail(rt, job_id, exc)
        if not isinstance(exc, Exception):
            raise
    # Only after a failure or a cancel, and outside the except clause: the traceback's frames
    # may hold the job's tensors. A full collection costs ~0.2 s with torch loaded, too much
    # for every job; after a success, reference counting has already freed everything.
    _free_memory()


def _fit_pauses(rt: Runtime, lm: LoadedModel, doc: JobDocument) -> FitPauses | None:
    """For a fit, the hook that serves its model's queued short jobs between its steps."""
    spec = rt.registry.specs[doc.model]
    if JobKind(doc.kind) not in FIT_KINDS or spec.fit_pause_ms <= 0:
        return None

    def serve() -> int:
        members = rt.claims.take(lm, doc.model, SHORT_KINDS, [], spec.max_batch_tokens)
        for member in members:
            log.info(
                "job %s: running %s on %s, in a pause of %s",
                member.doc.id, member.doc.kind, doc.model, doc.id,
            )  # fmt: skip
        if members:
            rt.batching.in_fit_pauses += len(members)
            try:
                _run_shared(rt, lm, members)
            except Exception as exc:  # a lone job's pass failed: its own failure, not the fit's
                for member in members:
                    _fail(rt, member.doc.id, exc)
                _free_memory()
        return len(members)

    return FitPauses(serve, spec.fit_pause_ms / 1000)


def _run_shared(rt: Runtime, lm: LoadedModel, members: list[Member]) -> None:
    """One forward pass for all ``members``, then each job's result stored or its error
    recorded. If the shared pass fails (out of memory, or any error one job may have
    caused), each job runs again on its own, so one job's failure fails only that job."""
    items = [m.prepared for m in members]
    try:
        shared = batcher.forward(lm, items)
    except Exception as exc:
        if len(members) == 1:
            raise
        log.warning("shared pass of %d jobs failed (%s); running them one by one", len(items), exc)
        shared = None
    if shared is None:
        _free_memory()
        for member in members:
            try:
                _run_shared(rt, lm, [member])
            except Exception as exc:
                _fail(rt, member.doc.id, exc)
        return
    rt.batching.record(len(members))
    failed = False
    for member, outcome in zip(members, batcher.results(lm, items, shared), strict=True):
        try:
            if isinstance(outcome, Exception):
                raise outcome
            _deliver(rt, member.doc, outcome)
        except Exception as exc:
            _fail(rt, member.doc.id, exc)
            failed = True
    if failed:
        del shared, outcome
        _free_memory()


def _deliver(rt: Runtime, doc: JobDocument, result: AnalysisResult) -> None:
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


def _fail(rt: Runtime, job_id: str, exc: BaseException) -> None:
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


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
