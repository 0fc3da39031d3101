"""Job records in Redis: the source of truth for job documents, shared by API and workers.

A record is one hash ``lens:job:<id>``; status changes go through a Lua script
so that a cancel and a worker's start can never both win. Every change is
published on ``lens:events:<id>`` for the server-sent event stream.

Beside the records: ``lens:running`` (job → worker and model, for reaping and
per-model counts), a set of active (queued or running) jobs per owner for the
quota, and counters and duration histograms of finished jobs for ``/metrics``.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import redis
import redis.asyncio
from redis.typing import EncodableT, FieldT

from app.schemas import JobDocument, JobError, JobProgress, JobStatus, TensorInfo

PREFIX = "lens"
ANONYMOUS = "anonymous"
RUNNING = f"{PREFIX}:running"
SUBMITTED = f"{PREFIX}:stats:submitted"
FINISHED = f"{PREFIX}:stats:finished"
DURATION_BUCKETS_S = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600)
"""Upper bounds of the job-duration histogram (seconds from start to finish)."""
_JSON_FIELDS = ("params", "progress", "error", "summary", "tensors")

# KEYS[1] = job hash, KEYS[2] = events channel; ARGV[1] = JSON list of allowed current
# statuses, ARGV[2] = new status, ARGV[3] = the worker that must hold the job ('' = any),
# ARGV[4..] = field/value pairs to set alongside.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return 0 end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[3] then return 0 end
local allowed = cjson.decode(ARGV[1])
for _, s in ipairs(allowed) do
  if s == current then
    redis.call('HSET', KEYS[1], 'status', ARGV[2])
    for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    redis.call('PUBLISH', KEYS[2], cjson.encode({event = 'status', status = ARGV[2]}))
    return 1
  end
end
return 0
"""

# KEYS[1] = job hash, KEYS[2] = events channel; ARGV[1] = progress JSON, ARGV[2] = event JSON.
# A cancelled job's step is not published: the cancel is answered first (returns 1).
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 1 end
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 0
"""

# Publishes a status event with the whole record (KEYS[1]) on KEYS[2], so that event
# streams need not read it back; returns the record's fields as HGETALL does.
_PUBLISH_STATUS = """
local function publish_status(status)
  local flat = redis.call('HGETALL', KEYS[1])
  local record = {}
  for i = 1, #flat, 2 do record[flat[i]] = flat[i + 1] end
  redis.call('PUBLISH', KEYS[2], cjson.encode({event = 'status', status = status, record = record}))
  return flat
end
"""

# KEYS[1] = job hash, KEYS[2] = events channel, KEYS[3] = running index, optionally
# KEYS[4] = a queue list to take the job from and KEYS[5] = the queue's copy of the job;
# ARGV[1] = worker, ARGV[2] = start time (ISO), ARGV[3] = start time (epoch seconds),
# ARGV[4] = job id. Returns the record's fields (HGETALL), or nil if the job is not queued
# (or not in that queue).
_START = (
    _PUBLISH_STATUS
    + """
if KEYS[4] then
  if redis.call('LREM', KEYS[4], 1, ARGV[4]) ~= 1 then return nil end
  redis.call('DEL', KEYS[5])
end
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return nil end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started_at', ARGV[2],
           'started_ts', ARGV[3])
local model = redis.call('HGET', KEYS[1], 'model') or ''
redis.call('HSET', KEYS[3], ARGV[4], cjson.encode({worker = ARGV[1], model = model}))
return publish_status('running')
"""
)

# The end of a job, with all its bookkeeping: the status change (as _TRANSITION, its
# fields given as one JSON object), the record's expiry, the running index, the owner's
# active set, the finished counter and the duration histogram.
# KEYS[1] = job hash, KEYS[2] = events channel, KEYS[3] = running index, KEYS[4] = finished
# counters; ARGV[1] = JSON list of allowed statuses, ARGV[2] = new status, ARGV[3] = holder
# ('' = any), ARGV[4] = TTL (s), ARGV[5] = end time (epoch s), ARGV[6] = JSON fields,
# ARGV[7] = job id, ARGV[8] = key prefix, ARGV[9] = JSON list of histogram bucket bounds.
_FINISH = (
    _PUBLISH_STATUS
    + """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return 0 end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[3] then return 0 end
local allowed = false
for _, s in ipairs(cjson.decode(ARGV[1])) do
  if s == current then allowed = true end
end
if not allowed then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for name, value in pairs(cjson.decode(ARGV[6])) do redis.call('HSET', KEYS[1], name, value) end
publish_status(ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('HDEL', KEYS[3], ARGV[7])
local kind, owner, started = unpack(redis.call('HMGET', KEYS[1], 'kind', 'owner', 'started_ts'))
if owner then redis.call('SREM', ARGV[8] .. ':active:' .. owner, ARGV[7]) end
if not kind then return 1 end
redis.call('HINCRBY', KEYS[4], kind .. ':' .. ARGV[2], 1)
if started then
  local seconds = tonumber(ARGV[5]) - tonumber(started)
  local key = ARGV[8] .. ':stats:duration:' .. kind
  for _, bound in ipairs(cjson.decode(ARGV[9])) do
    if seconds <= tonumber(bound) then redis.call('HINCRBY', key, bound, 1) end
  end
  redis.call('HINCRBY', key, '+Inf', 1)
  redis.call('HINCRBY', key, 'count', 1)
  redis.call('HINCRBYFLOAT', key, 'sum', seconds)
end
return 1
"""
)


def new_job_id() -> str:
    """An unguessable job id (128 random bits)."""
    return secrets.token_hex(16)


def now() -> datetime:
    return datetime.now(UTC)


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def events_channel(job_id: str) -> str:
    return f"{PREFIX}:events:{job_id}"


def owner_index(owner: str) -> str:
    return f"{PREFIX}:jobs:{owner}"


def active_set(owner: str) -> str:
    return f"{PREFIX}:active:{owner}"


def duration_key(kind: str) -> str:
    return f"{PREFIX}:stats:duration:{kind}"


@dataclass(frozen=True)
class JobRecord:
    """A job as stored: its public document plus who owns it."""

    document: JobDocument
    owner: str
    cancel_requested: bool
    worker: str | None
    attempts: int = 0


@dataclass(frozen=True)
class RunningJob:
    job_id: str
    worker: str
    model: str


class JobStore:
    """Reads and writes job records; one instance per Redis connection.

    A worker's store is made with its ``worker`` name: it then finishes only jobs that
    worker holds, so a worker presumed dead (and its job re-queued elsewhere) cannot
    overwrite the new run's outcome. ``stop_locally`` makes ``report_progress`` answer
    "cancelled" for a job in this process only, which stops it at its next step without touching
    the record (used on shutdown, when the record has already been settled).
    """

    def __init__(self, connection: redis.Redis, worker: str | None = None) -> None:
        self.redis = connection
        self.worker = worker
        self._transition = connection.register_script(_TRANSITION)
        self._progress = connection.register_script(_PROGRESS)
        self._start = connection.register_script(_START)
        self._finish_script = connection.register_script(_FINISH)
        self._stopped: set[str] = set()

    def create(
        self,
        *,
        kind: str,
        model: str,
        owner: str,
        params: dict[str, Any],
        pipeline: redis.client.Pipeline | None = None,
    ) -> JobDocument:
        """A new queued job's record; written with ``pipeline`` (not executed here) when
        given, so that the caller can enqueue the job in the same transaction."""
        job_id = new_job_id()
        created = now()
        fields = {
            "id": job_id,
            "kind": kind,
            "model": model,
            "owner": owner,
            "status": JobStatus.QUEUED.value,
            "created_at": created.isoformat(),
            "params": json.dumps(params),
        }
        pipe = pipeline if pipeline is not None else self.redis.pipeline()
        pipe.hset(job_key(job_id), mapping=cast("dict[FieldT, EncodableT]", fields))
        pipe.zadd(owner_index(owner), {job_id: created.timestamp()})
        pipe.sadd(active_set(owner), job_id)
        pipe.hincrby(SUBMITTED, kind, 1)
        if pipeline is None:
            pipe.execute()
        return self.document_of(fields)

    def get(self, job_id: str) -> JobRecord | None:
        return self.record_of(cast("dict[bytes, bytes]", self.redis.hgetall(job_key(job_id))))

    @classmethod
    async def get_async(cls, connection: redis.asyncio.Redis, job_id: str) -> JobRecord | None:
        """:meth:`get` through an asyncio client (the API's request handlers)."""
        return cls.record_of(cast("dict[bytes, bytes]", await connection.hgetall(job_key(job_id))))

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        """The records of ``job_ids`` (None for each that has none), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(job_key(job_id))
        return [self.record_of(raw) for raw in pipe.execute()]

    @classmethod
    def record_of(cls, raw: dict[bytes, bytes]) -> JobRecord | None:
        """A record from its hash as Redis returns it (HGETALL); None if there is none."""
        if not raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        return JobRecord(
            document=cls.document_of(fields),
            owner=fields["owner"],
            cancel_requested=fields.get("cancel") == "1",
            worker=fields.get("worker") or None,
            attempts=int(fields.get("attempts", 0)),
        )

    def params(self, job_id: str) -> dict[str, Any]:
        raw = self.redis.hget(job_key(job_id), "params")
        return json.loads(raw) if raw else {}

    def transition(
        self,
        job_id: str,
        allowed: Iterable[JobStatus],
        new: JobStatus,
        *,
        holder: str | None = None,
        **fields: Any,
    ) -> bool:
        """Move to ``new`` only if the current status is one of ``allowed`` (and, with
        ``holder``, the job is held by that worker); True if it moved."""
        argv: list[str] = [json.dumps([s.value for s in allowed]), new.value, holder or ""]
        for name, value in fields.items():
            argv += [name, _encode(name, value)]
        keys = [job_key(job_id), events_channel(job_id)]
        return bool(self._transition(keys=keys, args=argv))

    def start(
        self, job_id: str, worker: str, *, unqueue: tuple[str, str] | None = None
    ) -> JobRecord | None:
        """Mark a queued job running on ``worker`` (and in the running index) and return
        its record, in one round trip; None if it is not queued (cancelled, taken).

        ``unqueue`` (a queue's list key and its entry's key) first takes the job off that
        queue, atomically: None if it was not there (another worker was first)."""
        return self._started(self._start_script(job_id, worker, unqueue))

    def start_many(
        self, worker: str, jobs: Sequence[tuple[str, tuple[str, str] | None]]
    ) -> list[JobRecord | None]:
        """:meth:`start` for each (job id, unqueue) of ``jobs``, in one round trip; each
        start is atomic on its own."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, unqueue in jobs:
            self._start_script(job_id, worker, unqueue, client=pipe)
        return [self._started(flat) for flat in pipe.execute()]

    def _start_script(
        self,
        job_id: str,
        worker: str,
        unqueue: tuple[str, str] | None,
        client: redis.client.Pipeline | None = None,
    ) -> object:
        started = now()
        keys = [job_key(job_id), events_channel(job_id), RUNNING, *(unqueue or ())]
        argv = [worker, started.isoformat(), repr(started.timestamp()), job_id]
        return self._start(keys=keys, args=argv, client=client)

    def _started(self, flat: object) -> JobRecord | None:
        pairs = cast("list[bytes] | None", flat) or []
        return self.record_of(dict(zip(pairs[::2], pairs[1::2], strict=True)))

    def running(self) -> list[RunningJob]:
        """Jobs marked running, with the worker holding each."""
        jobs = []
        for raw_id, raw in cast("dict[bytes, bytes]", self.redis.hgetall(RUNNING)).items():
            value = json.loads(raw)
            jobs.append(RunningJob(raw_id.decode(), value["worker"], value["model"]))
        return jobs

    def running_counts(self) -> Counter[str]:
        """Running jobs per model."""
        return Counter(job.model for job in self.running())

    def orphans(self, alive: set[str]) -> list[RunningJob]:
        """Running jobs whose worker is not among ``alive``."""
        return [job for job in self.running() if job.worker not in alive]

    def give_up(self, job: RunningJob, error: JobError, *, retry: bool, ttl_s: int) -> str | None:
        """Settle a running job whose run ended without an outcome (its worker died or was
        shut down): back to ``queued`` for one more attempt when ``retry`` allows and it
        has not been retried yet, else ``failed`` with ``error``. Returns ``"requeued"``,
        ``"failed"``, or None if the job had already moved on. The caller re-enqueues."""
        record = self.get(job.job_id)
        outcome: str | None = None
        if record is None or record.document.status is not JobStatus.RUNNING:
            pass
        elif retry and record.attempts == 0:
            if self.transition(
                job.job_id, [JobStatus.RUNNING], JobStatus.QUEUED, holder=job.worker, attempts=1
            ):
                self.redis.hdel(
                    job_key(job.job_id), "started_at", "started_ts", "worker", "progress"
                )
                outcome = "requeued"
        elif self._finish(
            job.job_id, JobStatus.FAILED, {"error": error.model_dump()}, ttl_s, holder=job.worker
        ):
            outcome = "failed"
        self.redis.hdel(RUNNING, job.job_id)
        return outcome

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        error: JobError | None = None,
        summary: dict[str, Any] | None = None,
        tensors: dict[str, TensorInfo] | None = None,
        ttl_s: int,
    ) -> bool:
        """End a running job (held by this store's worker, if it has one)."""
        fields: dict[str, Any] = {}
        if error is not None:
            fields["error"] = error.model_dump()
        if summary is not None:
            fields["summary"] = summary
        if tensors is not None:
            fields["tensors"] = {k: v.model_dump() for k, v in tensors.items()}
        return self._finish(job_id, status, fields, ttl_s, holder=self.worker)

    def cancel_queued(self, job_id: str, ttl_s: int) -> bool:
        """Cancel a job that no worker has started; True if it was still queued."""
        return self._finish(job_id, JobStatus.CANCELLED, {}, ttl_s, allowed=[JobStatus.QUEUED])

    def _finish(
        self,
        job_id: str,
        status: JobStatus,
        fields: dict[str, Any],
        ttl_s: int,
        *,
        holder: str | None = None,
        allowed: list[JobStatus] | None = None,
    ) -> bool:
        finished = now()
        fields["finished_at"] = finished
        encoded = {name: _encode(name, value) for name, value in fields.items()}
        keys = [job_key(job_id), events_channel(job_id), RUNNING, FINISHED]
        argv = [
            json.dumps([s.value for s in allowed or [JobStatus.RUNNING]]),
            status.value,
            holder or "",
            str(ttl_s),
            repr(finished.timestamp()),
            json.dumps(encoded),
            job_id,
            PREFIX,
            json.dumps([str(b) for b in DURATION_BUCKETS_S]),
        ]
        return bool(self._finish_script(keys=keys, args=argv))

    def request_cancel(self, job_id: str) -> None:
        self.redis.hset(job_key(job_id), "cancel", "1")

    def stop_locally(self, job_id: str) -> None:
        self._stopped.add(job_id)

    def report_progress(self, job_id: str, progress: JobProgress) -> bool:
        """Store and publish a running job's progress, unless its cancellation was
        requested: then return True and publish nothing. One round trip per report,
        which a fit pays at every update."""
        if job_id in self._stopped:
            return True
        event = json.dumps({"event": "progress", **progress.model_dump()})
        keys = [job_key(job_id), events_channel(job_id)]
        return bool(self._progress(keys=keys, args=[progress.model_dump_json(), event]))

    def active_count(self, owner: str, quota: int | None = None, size: int | None = None) -> int:
        """The owner's queued and running jobs. Every end of a job leaves the set in the
        same script, so its size is the count (one SCARD, or ``size`` if the caller has
        read it); once it reaches ``quota``, where a refusal is at stake, the set is
        checked against the records and pruned of jobs that vanished without ending."""
        if size is None:
            size = cast(int, self.redis.scard(active_set(owner)))
        if quota is None or size < quota:
            return size
        ids = [i.decode() for i in cast("set[bytes]", self.redis.smembers(active_set(owner)))]
        if not ids:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(job_key(job_id), "status")
        statuses = pipe.execute()
        ended = [
            i
            for i, s in zip(ids, statuses, strict=True)
            if s is None or JobStatus(s.decode()).is_final
        ]
        if ended:
            self.redis.srem(active_set(owner), *ended)
        return len(ids) - len(ended)

    def list_ids(self, owner: str, limit: int, offset: int = 0) -> list[str]:
        """The owner's job ids, newest first; expired records are pruned from the index."""
        ids = [
            i.decode()
            for i in cast(
                "list[bytes]",
                self.redis.zrevrange(owner_index(owner), offset, offset + limit - 1),
            )
        ]
        alive = self._exist(ids)
        dead = [i for i, ok in zip(ids, alive, strict=True) if not ok]
        if dead:
            self.redis.zrem(owner_index(owner), *dead)
        return [i for i, ok in zip(ids, alive, strict=True) if ok]

    def prune_index(self, owner_key: str, older_than: float) -> int:
        """Drop expired jobs created before ``older_than`` (a timestamp) from an owner's
        index; the sweeper calls it so that indexes of idle owners do not grow forever."""
        ids = [
            i.decode()
            for i in cast("list[bytes]", self.redis.zrangebyscore(owner_key, "-inf", older_than))
        ]
        dead = [i for i, ok in zip(ids, self._exist(ids), strict=True) if not ok]
        if dead:
            self.redis.zrem(owner_key, *dead)
        return len(dead)

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(job_key(job_id)))

    def _exist(self, ids: list[str]) -> list[bool]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(job_key(job_id))
        return [bool(x) for x in pipe.execute()]

    @staticmethod
    def document_of(fields: dict[str, str]) -> JobDocument:
        """The public document of a record's fields (as stored, or as a status event
        carries them)."""
        data: dict[str, Any] = {k: v for k, v in fields.items() if k in JobDocument.model_fields}
        data["retries"] = int(fields.get("attempts", 0))
        for name in _JSON_FIELDS:
            if name in data:
                data[name] = json.loads(data[name])
        return JobDocument.model_validate(data)


def _encode(name: str, value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if name in _JSON_FIELDS:
        return json.dumps(value)
    return str(value)
