"""The lens worker's changes to RQ's worker, against a real Redis."""

from __future__ import annotations

import pytest
import redis
from redis.connection import Connection
from rq.serializers import JSONSerializer

from app import queue
from app.core.config import Settings
from workers.process import LensWorker, _Shutdown


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
