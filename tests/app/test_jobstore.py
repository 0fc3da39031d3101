"""Job records against a real Redis: transitions are atomic, events are published."""

from __future__ import annotations

import json

import redis

from app.jobstore import ANONYMOUS, JobStore
from app.keys import events_channel, job_key, new_job_id
from app.schemas import JobError, JobProgress, JobStatus
from tests.waiting import wait_until


def make(store: JobStore, owner: str = ANONYMOUS):
    return store.create(kind="score", model="m", owner=owner, params={"texts": ["a"]})


def test_create_and_read_back(redis_conn: redis.Redis) -> None:
    store = JobStore(redis_conn)
    doc = make(store)
    assert len(doc.id) == 32 and doc.status is JobStatus.QUEUED
    record = store.get(doc.id)
    assert record is not None and record.owner == ANONYMOUS
    assert record.document.params == {"texts": ["a"]}
    assert store.get("f" * 32) is None


def test_cancel_and_start_cannot_both_win(redis_conn: redis.Redis) -> None:
    store = JobStore(redis_conn)
    doc = make(store)
    assert store.transition(doc.id, [JobStatus.QUEUED], JobStatus.CANCELLED)
    assert not store.start(doc.id, "w1")
    record = store.get(doc.id)
    assert record is not None and record.document.status is JobStatus.CANCELLED


def test_many_starts_in_one_round_trip_each_win_or_lose_alone(
    redis_conn: redis.Redis,
) -> None:
    """What a worker claiming a batch does: each job taken off its queue and started, or
    None where it was cancelled or not on the queue (another worker was first)."""
    store = JobStore(redis_conn)
    queued, cancelled, elsewhere = (make(store).id for _ in range(3))
    redis_conn.rpush("q", queued, cancelled)
    for job_id in (queued, cancelled, elsewhere):
        redis_conn.set(f"entry:{job_id}", "x")
    assert store.transition(cancelled, [JobStatus.QUEUED], JobStatus.CANCELLED)
    records = store.get_many([queued, cancelled, "f" * 32])
    assert [r.document.id if r else None for r in records] == [queued, cancelled, None]
    started = store.start_many(
        "w1", [(job_id, ("q", f"entry:{job_id}")) for job_id in (queued, cancelled, elsewhere)]
    )
    assert started[0] is not None and started[0].document.status is JobStatus.RUNNING
    assert started[1:] == [None, None]
    assert redis_conn.lrange("q", 0, -1) == []  # the cancelled one leaves the queue too
    assert [r.document.status for r in store.get_many([queued, elsewhere]) if r] == [
        JobStatus.RUNNING,
        JobStatus.QUEUED,
    ]


def test_finish_sets_fields_expiry_and_publishes(redis_conn: redis.Redis) -> None:
    store = JobStore(redis_conn)
    doc = make(store)
    pubsub = redis_conn.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(events_channel(doc.id))
    assert store.start(doc.id, "w1")
    assert not store.report_progress(doc.id, JobProgress(stage="none", step=1, total=2, loss=0.5))
    err = JobError(type="X", message="boom")
    assert store.finish(doc.id, JobStatus.FAILED, error=err, ttl_s=100)
    assert not store.finish(doc.id, JobStatus.SUCCEEDED, ttl_s=100)
    events = []

    def three() -> bool:
        if (m := pubsub.get_message(timeout=0.5)) is not None:
            events.append(json.loads(m["data"]))
        return len(events) >= 3

    wait_until(three, 5, lambda: f"three events; got {events}", interval=0)
    assert [e["event"] for e in events] == ["status", "progress", "status"]
    assert events[1]["loss"] == 0.5 and events[2]["status"] == "failed"
    record = store.get(doc.id)
    assert record is not None and record.document.error == err
    assert 0 < redis_conn.ttl(f"lens:job:{doc.id}") <= 100


def test_progress_reports_answer_whether_the_owner_cancelled(redis_conn: redis.Redis) -> None:
    store = JobStore(redis_conn, worker="w1")
    doc = make(store)
    assert store.start(doc.id, "w1")
    assert not store.report_progress(doc.id, JobProgress(stage="none", step=1, total=3))
    JobStore(redis_conn).request_cancel(doc.id)
    assert store.report_progress(doc.id, JobProgress(stage="none", step=2, total=3))
    record = store.get(doc.id)
    assert record is not None and record.document.progress is not None
    assert record.document.progress.step == 1, "nothing is published past the cancel"


def test_listing_is_per_owner_and_newest_first(redis_conn: redis.Redis) -> None:
    store = JobStore(redis_conn)
    first, second = make(store, "alice"), make(store, "alice")
    make(store, "bob")
    assert store.list_ids("alice", 10) == [second.id, first.id]
    redis_conn.delete(f"lens:job:{first.id}")
    assert store.list_ids("alice", 10) == [second.id]


def test_active_count_is_the_set_size_until_the_quota_needs_it_exact(
    redis_conn: redis.Redis,
) -> None:
    """A job whose record vanished without ending (flushed by hand, say) still counts in
    the cheap count, and is pruned once a reservation reaches the quota."""
    store = JobStore(redis_conn)
    kept, lost = (make(store, owner="o").id for _ in range(2))
    redis_conn.delete(job_key(lost))
    assert store.active_count("o") == 2
    assert store.reserve("o", new_job_id(), 3) == 3
    assert store.reserve("o", new_job_id(), 3) == 3, "the lost job's place was freed"
    assert store.active_count("o") == 3 and store.get(kept) is not None
