"""The RQ entry point: JSON payload (a job id) in, core call, safetensors blob out.

RQ imports ``run_job`` by dotted path; the worker process installs its
:class:`Runtime` (resident models, stores) before it takes any job.

A score or trace job also takes the jobs of its kind queued behind it for the same
model, up to the model's token budget (``ModelSpec.max_batch_tokens``), and runs them
all in one padded forward pass (:mod:`workers.batcher`). Each job taken is removed
from the RQ queue atomically (LREM) before it is marked running, so no other worker
can run it too; a job it cannot take (cancelled, taken by another worker, invalid,
over the budget) stays queued and runs alone. If the API is still taking jobs of that
kind for the model when such a job starts (a burst), it first waits for them to be
queued, up to ``ModelSpec.batch_wait_ms``.
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from pydantic import TypeAdapter, ValidationError
from rq.job import Job

from app import queue
from app.blobstore import BlobStore, BlobTensor, blob_metadata
from app.core.config import Limits
from app.jobstore import JobRecord, JobStore, job_key
from app.schemas import JobDocument, JobError, JobKind, JobRequest, JobStatus, TensorInfo
from workers import batcher, limits
from workers.context import JobContext, until_redis_answers
from workers.handlers import HANDLERS
from workers.lens.errors import Cancelled, InvalidParameter, LensError
from workers.lens.loading import LoadedModel
from workers.lens.results import AnalysisResult
from workers.registry import ModelRegistry

log = logging.getLogger(__name__)
_requests: TypeAdapter[JobRequest] = TypeAdapter(JobRequest)

CLAIM_SCAN = 64
"""Queued jobs looked at, from the head of the queue, for companions of a batchable job."""
SUBMISSION_POLL_S = 0.001
SUBMISSIONS_QUIET_S = 0.010
"""How long no submission must be in flight before a waiting burst counts as queued:
the API's handlers come one after another, with short gaps between them."""


@dataclass
class BatchStats:
    """Shared forward passes of score and trace jobs, for the worker's heartbeat."""

    passes: int = 0
    jobs: int = 0
    batched_jobs: int = 0
    largest: int = 0

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


@dataclass(frozen=True)
class _Member:
    """A running job of a shared pass."""

    doc: JobDocument
    prepared: batcher.Prepared


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
        job = _parse(doc)
        lm = rt.registry.get(doc.model)
        leader = _prepare(lm, job)
        _check_tokens(rt, lm, job, leader)
        if leader is not None:
            head = _await_submissions(rt, doc, leader)
            _run_shared(rt, lm, [_Member(doc, leader), *_claim(rt, lm, doc, leader, head)])
            return
        ctx = JobContext(
            job_id=job_id,
            owner=record.owner,
            lm=lm,
            store=rt.store,
            blob_dir=rt.blobs.root,
            dataset_dir=rt.dataset_dir,
        )
        _deliver(rt, doc, HANDLERS[JobKind(doc.kind)](ctx, job))
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


def _parse(doc: JobDocument) -> JobRequest:
    return _requests.validate_python({"kind": doc.kind, "model": doc.model, **doc.params})


def _prepare(lm: LoadedModel, job: JobRequest) -> batcher.Prepared | None:
    """The job ready for a shared pass; ``None`` if it is not batchable or is invalid (its
    handler then runs it alone and reports its error)."""
    if not batcher.batchable(job):
        return None
    try:
        return batcher.prepare(lm, job)
    except LensError:
        return None


def _check_tokens(
    rt: Runtime, lm: LoadedModel, job: JobRequest, prepared: batcher.Prepared | None
) -> None:
    """The operator's token limits, and the job's size estimated from its token counts,
    before any compute; a prepared job's texts are counted from its batch."""
    counted = {"texts": prepared.batch.lengths.tolist()} if prepared is not None else None
    limits.check_job(job, lm, rt.limits, rt.dataset_dir, counted)


def _await_submissions(
    rt: Runtime, doc: JobDocument, leader: batcher.Prepared
) -> list[bytes] | None:
    """While the API is taking jobs of ``doc``'s kind for its model (a burst), wait until
    no such submission has been in flight for ``SUBMISSIONS_QUIET_S``, or for the model's
    ``batch_wait_ms`` at most: the burst then shares this pass instead of the next ones.
    A lone job, or one user's jobs one after another, finds nothing in flight and starts
    at once. The first check reads the head of the queue too, and returns it if nothing
    was in flight: it is then the claim's first scan."""
    spec = rt.registry.specs[doc.model]
    conn = rt.store.redis
    if batcher.is_full([leader], spec.max_batch_tokens):
        return None
    pipe = conn.pipeline(transaction=False)
    pipe.get(queue.submitting_key(doc.model, doc.kind))
    pipe.lrange(queue.queue_key(doc.model), 0, CLAIM_SCAN - 1)
    in_flight, head = pipe.execute()
    if not queue.in_flight_count(in_flight):
        return cast("list[bytes]", head)
    deadline, quiet_since = time.monotonic() + spec.batch_wait_ms / 1000, None
    while time.monotonic() < deadline:
        time.sleep(SUBMISSION_POLL_S)
        now = time.monotonic()
        if queue.submissions_in_flight(conn, doc.model, doc.kind):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= SUBMISSIONS_QUIET_S:
            return None
    return None


def _claim(
    rt: Runtime,
    lm: LoadedModel,
    doc: JobDocument,
    leader: batcher.Prepared,
    head: list[bytes] | None,
) -> list[_Member]:
    """Take queued jobs of ``doc``'s kind and model that fit the model's token budget,
    scanning the queue again while each scan finds new jobs (a burst still landing).
    Each scan reads its candidates' records in one round trip and takes the ones that
    fit in another; ``head``, if given, is the first scan's read of the queue."""
    budget = rt.registry.specs[doc.model].max_batch_tokens
    chosen = [leader]
    conn = rt.store.redis
    queue_key = queue.queue_key(doc.model)
    seen: set[str] = set()
    members: list[_Member] = []
    while not batcher.is_full(chosen, budget):
        queued = (
            head
            if head is not None
            else cast("list[bytes]", conn.lrange(queue_key, 0, CLAIM_SCAN - 1))
        )
        head = None
        ids = [i for i in (q.decode() for q in queued) if i not in seen]
        if not ids:
            break
        seen.update(ids)
        pipe = conn.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(job_key(job_id), "kind", "status")
        candidates = [
            job_id
            for job_id, (kind, status) in zip(ids, pipe.execute(), strict=True)
            if kind == doc.kind.encode() and status == JobStatus.QUEUED.encode()
        ]
        planned: list[_Member] = []
        for record in filter(None, rt.store.get_many(candidates)):  # gone meanwhile: skip
            if batcher.is_full(chosen, budget):
                break
            prepared = _fitting(rt, lm, record, chosen, budget)
            if prepared is not None:
                chosen.append(prepared)
                planned.append(_Member(record.document, prepared))
        takes = [(m.doc.id, (queue_key, Job.key_for(m.doc.id))) for m in planned]
        for member, taken in zip(planned, rt.store.start_many(rt.worker_name, takes), strict=True):
            if taken is None:  # cancelled meanwhile, or another worker was first
                chosen.remove(member.prepared)
                continue
            members.append(member)
            log.info(
                "job %s: running %s on %s, batched with %s",
                member.doc.id, doc.kind, doc.model, doc.id,
            )  # fmt: skip
    return members


def _fitting(
    rt: Runtime,
    lm: LoadedModel,
    record: JobRecord,
    chosen: list[batcher.Prepared],
    budget: int,
) -> batcher.Prepared | None:
    """A queued job ready for the shared pass, if it is valid and fits beside ``chosen``."""
    try:
        companion = _parse(record.document)
        prepared = _prepare(lm, companion)
        _check_tokens(rt, lm, companion, prepared)
    except Exception:  # it fails alone, with its own error, in its turn
        return None
    if prepared is None or batcher.padded_tokens([*chosen, prepared]) > budget:
        return None
    return prepared


def _run_shared(rt: Runtime, lm: LoadedModel, members: list[_Member]) -> None:
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
