"""RQ queues (one per served model, JSON serializer) and the workers' presence in Redis.

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
import json
from functools import lru_cache
from typing import Any, cast

import redis
import redis.asyncio
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from app.jobstore import PREFIX, RUNNING, job_key

RUN_JOB = "workers.tasks.run_job"
MODELS_KEY = f"{PREFIX}:models"


def queue_name(model: str) -> str:
    return f"{PREFIX}.{model}"


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


def submitting_key(model: str, kind: str) -> str:
    return f"{PREFIX}:submitting:{model}:{kind}"


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


WORKERS_KEY = f"{PREFIX}:workers"
"""Every worker that has beaten, with the time its beat expires (Redis' clock, in ms): an
index of the heartbeat keys, so that finding the live workers never scans the keyspace."""
WORKERS_FORGET_MS = 24 * 3600 * 1000
"""A worker silent this long leaves the index (a dead one is already told by its key)."""


def worker_key(worker: str) -> str:
    return f"{PREFIX}:worker:{worker}"


# KEYS[1] = the worker's key, KEYS[2] = the index; ARGV[1] = name, ARGV[2] = info,
# ARGV[3] = TTL (ms), ARGV[4] = how long a silent worker stays indexed (ms).
_BEAT = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], ms + tonumber(ARGV[3]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms - tonumber(ARGV[4]))
return 1
"""


def heartbeat(connection: redis.Redis, worker: str, info: dict[str, Any], ttl_s: float) -> None:
    """Refresh a worker's presence; it vanishes ``ttl_s`` after the last beat."""
    args: list[str | int] = [worker, json.dumps(info), int(ttl_s * 1000), WORKERS_FORGET_MS]
    connection.register_script(_BEAT)(keys=[worker_key(worker), WORKERS_KEY], args=args)


def remove_worker(connection: redis.Redis, worker: str) -> None:
    pipe = connection.pipeline(transaction=False)
    pipe.delete(worker_key(worker))
    pipe.zrem(WORKERS_KEY, worker)
    pipe.execute()


def live_workers(connection: redis.Redis) -> dict[str, dict[str, Any]]:
    """Workers whose heartbeat has not expired, with what they reported: the index's
    names, then their keys (one round trip each, whatever the keyspace holds)."""
    names = [n.decode() for n in cast("list[bytes]", connection.zrange(WORKERS_KEY, 0, -1))]
    if not names:
        return {}
    values = cast("list[bytes | None]", connection.mget([worker_key(n) for n in names]))
    return {n: json.loads(v) for n, v in zip(names, values, strict=True) if v is not None}


def publish_model_info(connection: redis.Redis, name: str, info: dict[str, Any]) -> None:
    connection.hset(MODELS_KEY, name, json.dumps(info))


def model_infos(connection: redis.Redis) -> dict[str, dict[str, Any]]:
    infos = cast("dict[bytes, bytes]", connection.hgetall(MODELS_KEY))
    return {k.decode(): json.loads(v) for k, v in infos.items()}


def tokenizer_key(sha256: str) -> str:
    """A published tokenizer, by the hash of its content (``ModelInfo.tokenizer_sha256``):
    models that share one share the key."""
    return f"{PREFIX}:tokenizer:{sha256}"


def publish_tokenizer(connection: redis.Redis, sha256: str, blob: bytes) -> None:
    """Store a tokenizer (``app.tokens.pack``) once: megabytes for a large vocabulary, so
    not again when a worker loads the model again, or another worker loads it."""
    if not connection.exists(tokenizer_key(sha256)):
        connection.set(tokenizer_key(sha256), blob)


def published_tokenizer(connection: redis.Redis, sha256: str) -> bytes | None:
    return cast("bytes | None", connection.get(tokenizer_key(sha256)))
