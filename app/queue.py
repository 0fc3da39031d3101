"""RQ queues (one per served model, JSON serializer) and the workers' presence in Redis.

The API enqueues by dotted path, so it never imports the code that runs jobs.
"""

from __future__ import annotations

import contextlib
import json
from functools import lru_cache
from typing import Any, cast

import redis
import redis.asyncio
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from app.jobstore import PREFIX

RUN_JOB = "workers.tasks.run_job"
MODELS_KEY = f"{PREFIX}:models"


def queue_name(model: str) -> str:
    return f"{PREFIX}.{model}"


def queue_key(model: str) -> str:
    """The Redis list of the model's RQ queue."""
    return Queue.redis_queue_namespace_prefix + queue_name(model)


@lru_cache(maxsize=1024)
def model_queue(connection: redis.Redis, model: str) -> Queue:
    """The model's RQ queue on ``connection``; made once (RQ resolves its serializer at
    every construction, a tenth of a submission's time)."""
    return Queue(queue_name(model), connection=connection, serializer=JSONSerializer)


def enqueue(
    connection: redis.Redis,
    model: str,
    job_id: str,
    timeout_s: int,
    pipeline: redis.client.Pipeline | None = None,
) -> None:
    """Put a job on its model's queue; the RQ job shares our job's id. With ``pipeline``,
    the commands join it and run when the caller executes it."""
    model_queue(connection, model).enqueue_call(
        RUN_JOB,
        args=(job_id,),
        job_id=job_id,
        timeout=timeout_s,
        result_ttl=0,
        failure_ttl=24 * 3600,
        pipeline=pipeline,
    )


SUBMITTING_TTL_S = 30
"""A submission counter left by an API process that died mid-request fades after this."""


def submitting_key(model: str, kind: str) -> str:
    return f"{PREFIX}:submitting:{model}:{kind}"


class Submission:
    """A submission of ``kind`` for ``model``, counted as in flight from :meth:`open_with` until
    it is queued (:meth:`done_with`, in the queueing transaction) or given up
    (:meth:`abandon`), so that a worker about to run a batchable job knows companions are
    on their way. The count goes down as the job lands: a worker that takes the job must
    not wait for the job's own submission. Opened with the asyncio client, from the
    request's handler at once (a thread-pool trip could be queued behind the burst)."""

    def __init__(self, model: str, kind: str) -> None:
        self._key, self._open = submitting_key(model, kind), False

    def open_with(self, pipeline: redis.asyncio.client.Pipeline) -> None:
        """Count the submission in flight as part of ``pipeline`` (call :meth:`opened` once
        it ran)."""
        pipeline.incr(self._key)
        pipeline.expire(self._key, SUBMITTING_TTL_S)

    def opened(self) -> None:
        """The pipeline given to :meth:`open_with` ran: the count is up."""
        self._open = True

    def done_with(self, pipeline: redis.client.Pipeline) -> None:
        """End the submission as part of ``pipeline`` (call :meth:`closed` once it ran)."""
        pipeline.decr(self._key)

    def closed(self) -> None:
        """The pipeline given to :meth:`done_with` ran: the count is already down."""
        self._open = False

    async def abandon(self, connection: redis.asyncio.Redis) -> None:
        """The submission failed before being queued: its count goes down."""
        if self._open:
            self._open = False
            await connection.decr(self._key)


def submissions_in_flight(connection: redis.Redis, model: str, kind: str) -> int:
    return in_flight_count(cast(bytes | None, connection.get(submitting_key(model, kind))))


def in_flight_count(raw: bytes | None) -> int:
    """The count of submissions in flight from a ``GET`` of :func:`submitting_key` (a
    pipeline's reply, say); no key is none in flight."""
    return int(raw or 0)


def queue_positions(connection: redis.Redis, jobs: list[tuple[str, str]]) -> list[int | None]:
    """Where each (model, job id) of ``jobs`` is in its model's queue (0 is next; None:
    not queued), in one round trip."""
    pipe = connection.pipeline(transaction=False)
    for model, job_id in jobs:
        pipe.lpos(queue_key(model), job_id)
    return cast("list[int | None]", pipe.execute())


async def queue_position_async(
    connection: redis.asyncio.Redis, model: str, job_id: str
) -> int | None:
    """Where the job is in its model's queue (0 is next; None: not queued)."""
    return cast("int | None", await connection.lpos(queue_key(model), job_id))


def queue_depth(connection: redis.Redis, model: str) -> int:
    return model_queue(connection, model).count


def drop(connection: redis.Redis, model: str, job_id: str) -> None:
    """Take a job off its queue and delete RQ's copy (its record stays with the job store)."""
    model_queue(connection, model).remove(job_id)
    with contextlib.suppress(NoSuchJobError):
        Job.fetch(job_id, connection=connection, serializer=JSONSerializer).delete()


def worker_key(worker: str) -> str:
    return f"{PREFIX}:worker:{worker}"


def heartbeat(connection: redis.Redis, worker: str, info: dict[str, Any], ttl_s: float) -> None:
    """Refresh a worker's presence; it vanishes ``ttl_s`` after the last beat."""
    connection.set(worker_key(worker), json.dumps(info), px=int(ttl_s * 1000))


def remove_worker(connection: redis.Redis, worker: str) -> None:
    connection.delete(worker_key(worker))


def live_workers(connection: redis.Redis) -> dict[str, dict[str, Any]]:
    """Workers whose heartbeat has not expired, with what they reported."""
    keys = list(connection.scan_iter(match=worker_key("*"), count=100))
    if not keys:
        return {}
    values = connection.mget(keys)
    prefix = len(worker_key(""))
    return {
        k.decode()[prefix:]: json.loads(v)
        for k, v in zip(keys, values, strict=True)
        if v is not None
    }


def publish_model_info(connection: redis.Redis, name: str, info: dict[str, Any]) -> None:
    connection.hset(MODELS_KEY, name, json.dumps(info))


def model_infos(connection: redis.Redis) -> dict[str, dict[str, Any]]:
    infos = cast("dict[bytes, bytes]", connection.hgetall(MODELS_KEY))
    return {k.decode(): json.loads(v) for k, v in infos.items()}
