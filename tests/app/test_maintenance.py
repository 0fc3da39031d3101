"""Settling jobs whose run ended without an outcome, against a real Redis: lost workers,
retries, shutdowns, and the guards that keep a stale worker from overwriting a new run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
import torch

from app import maintenance, presence, queue
from app.blobstore import BlobStore
from app.core.config import ModelSpec, Settings
from app.jobstore import JobStore
from app.maintenance import Reaper, reap_lost_jobs
from app.schemas import JobDocument, JobProgress, JobStatus
from tests.waiting import wait_until
from workers import outcomes, tasks
from workers.lens.results import AnalysisResult
from workers.process import _Shutdown, served_models
from workers.registry import ModelRegistry

SETTINGS = Settings(result_ttl_s=100, heartbeat_s=0.05)


def make(store: JobStore, model: str = "m") -> str:
    return store.create(kind="chg", model=model, owner="o", params={}).id


def test_a_lost_job_fails_with_worker_lost(redis_conn: redis.Redis) -> None:
    store = JobStore(redis_conn)
    alive, lost = make(store), make(store)
    store.start(alive, "w-alive")
    store.start(lost, "w-dead")
    presence.heartbeat(redis_conn, "w-alive", {}, ttl_s=10)
    assert reap_lost_jobs(store, SETTINGS) == [lost]
    record = store.get(lost)
    assert record is not None and record.document.status is JobStatus.FAILED
    assert record.document.error is not None and record.document.error.type == "WorkerLost"
    assert "w-dead" in record.document.error.message
    assert 0 < redis_conn.ttl(f"lens:job:{lost}") <= 100
    still = store.get(alive)
    assert still is not None and still.document.status is JobStatus.RUNNING
    assert store.running_counts() == {"m": 1}
    assert reap_lost_jobs(store, SETTINGS) == []


def test_with_retries_a_lost_job_runs_once_more_then_fails(redis_conn: redis.Redis) -> None:
    store, settings = JobStore(redis_conn), SETTINGS.model_copy(update={"retry_lost_jobs": True})
    job_id = make(store)
    store.start(job_id, "w1")
    assert reap_lost_jobs(store, settings) == [job_id]
    record = store.get(job_id)
    assert record is not None and record.document.status is JobStatus.QUEUED
    assert record.attempts == 1 and record.worker is None and record.document.started_at is None
    assert queue.model_queue(redis_conn, "m").job_ids == [job_id]
    assert store.running() == []

    stale = JobStore(redis_conn, worker="w1")
    assert store.start(job_id, "w2")
    assert not stale.finish(job_id, JobStatus.SUCCEEDED, ttl_s=100), "w1 no longer holds it"
    assert reap_lost_jobs(store, settings) == [job_id]
    record = store.get(job_id)
    assert record is not None and record.document.status is JobStatus.FAILED
    assert record.document.error is not None and record.document.error.type == "WorkerLost"


class Clock:
    """The reaper's monotonic clock, moved by the test instead of by waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_no_reaping_right_after_a_redis_outage(
    redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(redis_conn)
    job_id = make(store)
    store.start(job_id, "w-quiet")
    wait_until(
        lambda: int(redis_conn.info("server")["uptime_in_seconds"]) >= SETTINGS.worker_ttl_s,
        10,
        "Redis up for a worker lifetime",
    )
    clock = Clock()
    monkeypatch.setattr(maintenance, "time", clock)
    reap = Reaper(store, SETTINGS)
    reap.outage()
    noticed = clock.now
    assert reap() == [], "its heartbeat could not be written during the outage"
    clock.now = noticed + SETTINGS.worker_ttl_s / 2
    assert reap() == [], "still within a worker lifetime of the outage"
    clock.now = noticed + SETTINGS.worker_ttl_s
    assert reap() == [job_id], "a worker lifetime after it, reaping resumes"


def test_shutdown_fails_the_held_job_and_stops_it_locally(redis_conn: redis.Redis) -> None:
    api, worker = JobStore(redis_conn), JobStore(redis_conn, worker="w1")
    mine, other = make(api), make(api)
    worker.start(mine, "w1")
    api.start(other, "w2")
    _Shutdown(SETTINGS, "w1", worker).stop_jobs()
    record = api.get(mine)
    assert record is not None and record.document.status is JobStatus.FAILED
    assert record.document.error is not None and record.document.error.type == "WorkerShutdown"
    step = JobProgress(stage="none", step=1, total=2)
    assert worker.report_progress(mine, step), "stopped here: its next step stops it"
    assert not record.cancel_requested, "a local stop, not a cancellation by its owner"
    assert not worker.finish(mine, JobStatus.CANCELLED, ttl_s=100)
    assert api.get(other).document.status is JobStatus.RUNNING  # type: ignore[union-attr]


def test_shutdown_with_retries_requeues_and_the_old_run_cannot_end_it(
    redis_conn: redis.Redis,
) -> None:
    settings = SETTINGS.model_copy(update={"retry_lost_jobs": True})
    worker = JobStore(redis_conn, worker="w1")
    job_id = make(worker)
    worker.start(job_id, "w1")
    _Shutdown(settings, "w1", worker).stop_jobs()
    assert queue.model_queue(redis_conn, "m").job_ids == [job_id]
    assert not worker.finish(job_id, JobStatus.CANCELLED, ttl_s=100)
    assert worker.get(job_id).document.status is JobStatus.QUEUED  # type: ignore[union-attr]


def test_cancelling_a_queued_job_removes_it_from_rq(redis_conn: redis.Redis) -> None:
    store = JobStore(redis_conn)
    job_id = make(store)
    queue.enqueue(redis_conn, "m", job_id, timeout_s=60)
    assert store.active_count("o") == 1
    assert store.cancel_queued(job_id, ttl_s=100)
    queue.drop(redis_conn, "m", job_id)
    assert queue.queue_depth(redis_conn, "m") == 0
    assert not redis_conn.exists(f"rq:job:{job_id}")
    assert store.active_count("o") == 0
    assert not store.cancel_queued(job_id, ttl_s=100)


def test_workers_serve_the_models_assigned_to_their_name() -> None:
    settings = Settings(
        models={
            "small": ModelSpec(source="s"),
            "big": ModelSpec(source="b", workers=["gpu0", "gpu1"]),
            "other": ModelSpec(source="o", workers=["gpu2"]),
        }
    )
    assert served_models(settings, "gpu0") == ["big", "small"]
    assert served_models(settings, "gpu2") == ["other", "small"]
    assert served_models(settings, "cpu") == ["small"]
    assert served_models(settings, "gpu0", ["other"]) == ["other"]


def test_a_job_its_live_worker_no_longer_runs_is_settled(redis_conn: redis.Redis) -> None:
    """The worker's heartbeat lists its jobs: one missing from a list taken after the job
    started lost its outcome (a write that never reached Redis) and is settled."""
    api, worker = JobStore(redis_conn), JobStore(redis_conn, worker="w1")
    job_id = make(api)
    started = worker.start(job_id, "w1")
    assert started is not None and worker.holding()["jobs"] == [job_id]
    presence.heartbeat(redis_conn, "w1", {"holding": worker.holding()}, ttl_s=10)
    assert reap_lost_jobs(api, SETTINGS) == []
    (entry,) = api.running()
    before = {"jobs": [], "at": (entry.since or 0) - 1}
    presence.heartbeat(redis_conn, "w1", {"holding": before}, ttl_s=10)
    assert reap_lost_jobs(api, SETTINGS) == [], "a list from before its start proves nothing"
    presence.heartbeat(redis_conn, "w1", {"holding": {"jobs": [], "at": time.time()}}, ttl_s=10)
    assert reap_lost_jobs(api, SETTINGS) == [job_id]
    record = api.get(job_id)
    assert record is not None and record.document.status is JobStatus.FAILED
    assert (
        record.document.error is not None and "no longer running" in record.document.error.message
    )
    assert api.active_count("o") == 0, "its quota place is free"


def test_a_stale_attempt_can_neither_write_nor_delete_the_current_result(
    redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """retry_lost_jobs: w1's run is presumed lost and the job runs again on w2, which
    succeeds; w1 then resumes and finishes too. Its progress is refused, its result goes
    to a file of its own attempt, which it deletes when the record refuses its outcome."""
    settings = SETTINGS.model_copy(update={"retry_lost_jobs": True})
    api, blobs = JobStore(redis_conn), BlobStore(tmp_path)
    w1, w2 = JobStore(redis_conn, worker="w1"), JobStore(redis_conn, worker="w2")
    job_id = make(api)
    first = w1.start(job_id, "w1")
    assert reap_lost_jobs(api, settings) == [job_id]
    second = w2.start(job_id, "w2")
    assert first is not None and second is not None and second.attempts == 1

    def deliver(store: JobStore, doc: JobDocument, value: float) -> None:
        rt = tasks.Runtime(
            worker_name=store.worker or "", registry=ModelRegistry({}), store=store,
            blobs=blobs, dataset_dir=tmp_path, result_ttl_s=100,
        )  # fmt: skip
        result = AnalysisResult(tensors={"x": torch.full((2,), value)}, summary={"v": value})
        outcomes.deliver(rt, doc, result)

    deliver(w2, second.document, 2.0)
    current = blobs.path(job_id, 1).read_bytes()
    assert w1.report_progress(job_id, JobProgress(stage="none", step=9, total=10))
    deliver(w1, first.document, 1.0)
    assert blobs.path(job_id, 1).read_bytes() == current
    assert not blobs.path(job_id, 0).exists()
    record = api.get(job_id)
    assert record is not None and record.document.status is JobStatus.SUCCEEDED
    assert record.document.summary == {"v": 2.0} and record.document.progress is None
