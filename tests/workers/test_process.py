"""The lens worker's changes to RQ's worker, against a real Redis: one round trip per
heartbeat, no control channel, and nothing run but lens's own job function."""

from __future__ import annotations

import re
import sys

import pytest
import redis
from redis.connection import Connection
from rq import Callback, Queue
from rq.serializers import JSONSerializer

from app import keys, queue
from app.core.config import Settings
from workers.process import LensWorker, _Shutdown
from workers.rq_guard import ForeignJob, LensJob


def _worker(conn: redis.Redis) -> LensWorker:
    settings = Settings(redis_url="redis://unused")
    return LensWorker(
        [queue.model_queue(conn, "m")],
        name="w.1.1",
        connection=conn,
        serializer=JSONSerializer,
        shutdown=_Shutdown(settings, "w", store=None),  # type: ignore[arg-type]
    )


def test_heartbeat_refreshes_the_worker_in_one_round_trip(
    redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = _worker(redis_conn)
    worker.register_birth()
    redis_conn.persist(worker.key)
    redis_conn.hdel(worker.key, "last_heartbeat")
    sent: list[bytes] = []
    original = Connection.send_packed_command

    def counting(self: Connection, command: object, check_health: bool = True) -> None:
        sent.append(b"".join(command) if isinstance(command, list) else command)  # type: ignore[arg-type]
        original(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counting)
    worker.heartbeat()
    monkeypatch.undo()
    assert len(sent) == 1
    assert redis_conn.hget(worker.key, "last_heartbeat") is not None
    assert 0 < redis_conn.ttl(worker.key) <= worker.worker_ttl + 60


def test_heartbeat_given_a_pipeline_joins_it(redis_conn: redis.Redis) -> None:
    worker = _worker(redis_conn)
    worker.register_birth()
    redis_conn.persist(worker.key)
    with redis_conn.pipeline() as pipe:
        worker.heartbeat(30, pipeline=pipe)
        assert redis_conn.ttl(worker.key) == -1  # nothing sent before the pipeline runs
        pipe.execute()
    assert 0 < redis_conn.ttl(worker.key) <= 30


def _guarded_worker(conn: redis.Redis) -> LensWorker:
    settings = Settings(redis_url="redis://unused")
    return LensWorker(
        [
            Queue(
                keys.queue_name("m"), connection=conn, serializer=JSONSerializer, job_class=LensJob
            )
        ],
        name="w.1.2",
        connection=conn,
        serializer=JSONSerializer,
        job_class=LensJob,
        shutdown=_Shutdown(settings, "w", store=None),  # type: ignore[arg-type]
    )


def test_a_foreign_job_is_deleted_without_importing_anything(redis_conn: redis.Redis) -> None:
    assert "this" not in sys.modules  # importing `this` prints; it must never be imported
    rq_queue = queue.model_queue(redis_conn, "m")
    foreign = rq_queue.enqueue_call("this.s", args=("x",))
    hooked = rq_queue.enqueue_call(
        queue.RUN_JOB,
        args=("0" * 32,),
        on_failure=Callback("this.d"),
        on_success=Callback("this.c"),
    )
    extra = rq_queue.enqueue_call(queue.RUN_JOB, args=("0" * 32, "more"))
    worker = _guarded_worker(redis_conn)
    worker.work(burst=True)
    assert "this" not in sys.modules
    for job in (foreign, hooked, extra):
        assert not redis_conn.exists(job.key)
    assert rq_queue.count == 0 and not redis_conn.exists(rq_queue.intermediate_queue_key)
    assert worker.pubsub_thread is None, "no RQ control channel"


def test_lens_jobs_resolve_only_run_job(redis_conn: redis.Redis) -> None:
    rq_queue = queue.model_queue(redis_conn, "m")
    job = LensJob.fetch(
        rq_queue.enqueue_call(queue.RUN_JOB, args=("0" * 32,)).id,
        connection=redis_conn,
        serializer=JSONSerializer,
    )
    from workers import tasks

    assert job.func is tasks.run_job
    other = LensJob.fetch(
        rq_queue.enqueue_call("os.system", args=("true",)).id,
        connection=redis_conn,
        serializer=JSONSerializer,
    )
    with pytest.raises(ForeignJob, match=re.escape("'os.system' is not workers.tasks.run_job")):
        _ = other.func
