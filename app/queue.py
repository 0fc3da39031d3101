"""RQ queues (one per served model, JSON serializer), fair between keys, and the counts of
submissions in flight (workers' presence is :mod:`app.presence`).

The API enqueues by dotted path, so it never imports the code that runs jobs.

Queues are fair between keys. Workers take jobs from the head of a model's list (RQ's
own pop, and the claim of a shared score or trace pass), so fairness lives in the
list's order: a job is inserted, atomically, where its key's turn comes. Counting each
key's jobs ahead of it (running on that model, then queued), a job of a key with n such
jobs goes behind every job whose key has at most n jobs ahead of that one: at the end
of round n of a round robin over keys. A key's next job so waits behind at most one job
of each other key, however many that key has queued.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import cast

import redis
import redis.asyncio
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from app.keys import (
    RUNNING,
    job_key,
    queue_name,
    submitting_key,
)

RUN_JOB = "workers.tasks.run_job"


def queue_key(model: str) -> str:
    """The Redis list of the model's RQ queue."""
    return Queue.redis_queue_namespace_prefix + queue_name(model)


# KEYS[1] = the queue's list, KEYS[2] = the running index; ARGV[1] = job id, ARGV[2] =
# record key prefix, ARGV[3] = model. Inserts the job at its key's turn (see the module's
# docstring) and returns its position. One HGET per queued job: a few milliseconds for
# thousands of queued jobs.
_FAIR_PUSH = """
local function owner_of(id) return redis.call('HGET', ARGV[2] .. id, 'owner') or '' end
local owner = owner_of(ARGV[1])
local ahead = {}
for _, raw in ipairs(redis.call('HVALS', KEYS[2])) do
  local entry = cjson.decode(raw)
  if entry.model == ARGV[3] and entry.owner then
    ahead[entry.owner] = (ahead[entry.owner] or 0) + 1
  end
end
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
local owners, round, last = {}, ahead[owner] or 0, 0
for i, id in ipairs(ids) do
  owners[i] = owner_of(id)
  if owners[i] == owner then
    round = round + 1
    last = i
  end
end
for i, id in ipairs(ids) do
  local turn = ahead[owners[i]] or 0
  ahead[owners[i]] = turn + 1
  if i > last and turn > round then
    redis.call('LINSERT', KEYS[1], 'BEFORE', id, ARGV[1])
    return i - 1
  end
end
redis.call('RPUSH', KEYS[1], ARGV[1])
return #ids
"""


class FairQueue(Queue):
    """An RQ queue whose pushes insert each job at its key's turn; pops are RQ's own."""

    def push_job_id(
        self, job_id: str, pipeline: redis.client.Pipeline | None = None, at_front: bool = False
    ) -> None:
        if at_front:
            super().push_job_id(job_id, pipeline=pipeline, at_front=True)
            return
        # EVAL, not a registered script: in a pipeline, redis-py would ask whether the
        # script is loaded first, one more round trip per submission (Redis caches it).
        client = pipeline if pipeline is not None else self.connection
        model = self.name.removeprefix(queue_name(""))
        client.eval(_FAIR_PUSH, 2, self.key, RUNNING, job_id, job_key(""), model)


@lru_cache(maxsize=1024)
def model_queue(connection: redis.Redis, model: str) -> Queue:
    """The model's RQ queue on ``connection``; made once (RQ resolves its serializer at
    every construction, a tenth of a submission's time)."""
    return FairQueue(queue_name(model), connection=connection, serializer=JSONSerializer)


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


class Submission:
    """A submission of ``kind`` for ``model``, counted as in flight from :meth:`open_with` until
    it is queued (:meth:`done_with`, in the queueing transaction) or given up
    (:meth:`abandon_with`), so that a worker about to run a batchable job knows companions are
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

    def abandon_with(self, pipeline: redis.asyncio.client.Pipeline) -> bool:
        """The submission failed before being queued: its count goes down as part of
        ``pipeline``; False (and nothing added) if it is not counted."""
        if not self._open:
            return False
        self._open = False
        pipeline.decr(self._key)
        return True


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
