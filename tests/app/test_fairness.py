"""Keys take turns within a model's queue, and the quota is counted atomically (real
Redis; RQ's queue, as the API and the reaper enqueue)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import redis

from app import queue
from app.jobstore import JobStore
from app.keys import new_job_id
from app.schemas import JobStatus


def enqueue(store: JobStore, owner: str, model: str = "m") -> str:
    job_id = store.create(kind="chg", model=model, owner=owner, params={}).id
    queue.enqueue(store.redis, model, job_id, timeout_s=60)
    return job_id


def owners(store: JobStore, ids: dict[str, str], model: str = "m") -> str:
    return "".join(ids[i] for i in queue.model_queue(store.redis, model).job_ids)


def test_a_new_key_goes_ahead_of_a_long_queue(redis_conn: redis.Redis) -> None:
    store = JobStore(redis_conn)
    ids: dict[str, str] = {}
    for _ in range(4):
        ids[enqueue(store, "a")] = "a"
    assert owners(store, ids) == "aaaa"
    ids[enqueue(store, "b")] = "b"
    assert owners(store, ids) == "abaaa", "b's first job waits behind a's first only"
    ids[enqueue(store, "b")] = "b"
    ids[enqueue(store, "c")] = "c"
    assert owners(store, ids) == "abcabaa"
    ids[enqueue(store, "a")] = "a"
    assert owners(store, ids) == "abcabaaa", "a key's own jobs stay in order, at the end"
    ids[enqueue(store, "m", model="other")] = "m"
    assert owners(store, ids, "other") == "m", "each model's queue on its own"


def test_a_running_job_counts_as_its_keys_turn(redis_conn: redis.Redis) -> None:
    """A key whose job runs on the model has had its turn: another key's job goes first."""
    store = JobStore(redis_conn)
    ids: dict[str, str] = {}
    running = enqueue(store, "a")
    ids.update({enqueue(store, "a"): "a" for _ in range(3)})
    queue.model_queue(redis_conn, "m").remove(running)
    assert store.start(running, "w1") is not None
    ids[enqueue(store, "b")] = "b"
    assert owners(store, ids) == "baaa"
    assert store.finish(running, JobStatus.SUCCEEDED, ttl_s=60)
    ids[enqueue(store, "c")] = "c"
    assert owners(store, ids) == "bacaa"


def test_the_quota_holds_against_concurrent_reservations(redis_conn: redis.Redis) -> None:
    store = JobStore(redis_conn)
    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(lambda _: store.reserve("o", new_job_id(), 5), range(20)))
    assert sorted(c for c in counts if c > 0) == [1, 2, 3, 4, 5]
    assert all(c == -5 for c in counts if c <= 0)


def test_a_reservation_is_kept_until_its_record_is_written(redis_conn: redis.Redis) -> None:
    """At the quota, places of jobs that vanished are freed, not places whose records are
    still being written (a pending mark, written with the reservation)."""
    store = JobStore(redis_conn)
    pending, lost = new_job_id(), new_job_id()
    assert store.reserve("o", pending, 2) == 1
    assert store.reserve("o", lost, 2) == 2
    redis_conn.delete(f"lens:pending:{lost}")  # its API process died long ago
    assert store.reserve("o", new_job_id(), 2) == 2, "the lost place is freed, not the other"
    assert store.reserve("o", new_job_id(), 2) == -2
    doc = store.create(kind="score", model="m", owner="o", params={}, job_id=pending)
    assert not redis_conn.exists(f"lens:pending:{pending}")
    assert store.get(doc.id) is not None
