"""The RQ entry point: JSON payload (a job id) in, core call, safetensors blob out.

RQ imports ``run_job`` by dotted path; the worker process installs its
:class:`Runtime` (resident models, stores) before it takes any job.

A score or trace job also takes the jobs of its kind queued behind it for the same
model, up to the model's token budget, and runs them all in one padded forward pass
(:mod:`workers.shared_jobs`); a running chg, cchg or ablate job serves the model's
queued score and trace jobs the same way between two of its steps.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from app.schemas import JobKind, JobStatus
from workers.claim import parse, prepare
from workers.context import JobContext, until_redis_answers
from workers.handlers import HANDLERS
from workers.lens.errors import Cancelled
from workers.outcomes import deliver, fail, free_memory
from workers.runtime import Runtime
from workers.shared_jobs import fit_pauses, run_burst

log = logging.getLogger(__name__)


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
            run_burst(rt, lm, doc, leader)
            return
        pauses = fit_pauses(rt, lm, doc)
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
        deliver(rt, doc, result)
        return
    except Cancelled:
        until_redis_answers(
            lambda: rt.store.finish(job_id, JobStatus.CANCELLED, ttl_s=rt.result_ttl_s),
            f"job {job_id}: cancelled",
        )
        log.info("job %s: cancelled", job_id)
    except BaseException as exc:
        fail(rt, job_id, exc)
        if not isinstance(exc, Exception):
            raise
    # Only after a failure or a cancel, and outside the except clause: the traceback's frames
    # may hold the job's tensors. A full collection costs ~0.2 s with torch loaded, too much
    # for every job; after a success, reference counting has already freed everything.
    free_memory()
