"""The claim of queued jobs for a shared pass, against a real Redis and a real model.

Two workers race for the same queue: between one worker's read of the queue and its
start of the jobs it chose, the other's RQ can take one of them. The claim must leave
that job to the other worker and run the rest. Before the fix, dropping the lost job
from the pass compared prepared jobs with ``==``, which for two jobs of the same
parameters compares their token tensors and raises "Boolean value of Tensor with more
than one value is ambiguous": the starting job failed with it, and the jobs the claim
had already marked running were never run, so a client waiting on one got 409 when its
wait ran out (issue 25 §3).
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from app import queue
from app.keys import RUNNING
from app.schemas import JobStatus, ScoreJob, TraceJob
from tests.integration.test_batching import LONG, MEDIUM, MODEL, SHORT, assert_as_alone
from tests.workers.conftest import submit
from workers import shared_jobs, shared_pass, tasks
from workers.claim import Member, prepare


def rq_takes(rt: tasks.Runtime, job_id: str) -> None:
    """What a worker's RQ does first with the job at the head of the queue (LMOVE): the job
    leaves the queue, still ``queued`` until that worker starts it."""
    assert rt.store.redis.lrem(queue.queue_key(MODEL), 1, job_id) == 1


def test_a_job_another_worker_took_meanwhile_is_left_to_it(runtime: tasks.Runtime) -> None:
    rt = runtime
    job = TraceJob(model=MODEL, texts=MEDIUM, layers=[1], sites=["block_output"])
    leader_id, mine, theirs = (submit(rt, job) for _ in range(3))
    rq_takes(rt, leader_id)
    record = rt.store.start(leader_id, rt.worker_name)
    assert record is not None
    conn = rt.store.redis
    head = cast("list[bytes]", conn.lrange(queue.queue_key(MODEL), 0, -1))
    rq_takes(rt, theirs)  # the other worker, between this one's read and its start
    lm = rt.registry.get(MODEL)
    leader = prepare(lm, job)
    assert leader is not None
    taken = rt.claims.take(lm, MODEL, {"trace"}, [leader], 10_000, head)
    assert [m.doc.id for m in taken] == [mine]
    shared_jobs.run_shared(rt, lm, [Member(record.document, leader), *taken])
    for job_id in (leader_id, mine):
        assert_as_alone(rt, job_id, job)
    assert rt.store.get(theirs).document.status is JobStatus.QUEUED, "left to the other worker"
    tasks.run_job(theirs)
    assert_as_alone(rt, theirs, job)
    assert conn.hlen(RUNNING) == 0, "no job left running"


def test_a_queued_job_too_big_to_share_a_pass_is_tokenised_once(
    runtime: tasks.Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another key's job too big for any shared pass stays queued; the small jobs that
    start one after another read and tokenise it once between them, not each."""
    rt = runtime
    spec = rt.registry.specs[MODEL].model_copy(update={"max_batch_tokens": 64})
    monkeypatch.setitem(rt.registry.specs, MODEL, spec)
    huge = ScoreJob(model=MODEL, texts=[LONG] * 40)
    huge_id = submit(rt, huge)
    prepared: list[Any] = []
    real_prepare = shared_pass.prepare

    def counting(lm: Any, job: Any) -> shared_pass.Prepared:
        prepared.append(job)
        return real_prepare(lm, job)

    monkeypatch.setattr(shared_pass, "prepare", counting)
    small = ScoreJob(model=MODEL, texts=SHORT)
    for _ in range(3):
        small_id = submit(rt, small)
        rq_takes(rt, small_id)
        tasks.run_job(small_id)
        assert_as_alone(rt, small_id, small)
    assert sum(job == huge for job in prepared) == 1
    assert rt.store.get(huge_id).document.status is JobStatus.QUEUED
    assert huge_id in rt.claims.footprints
