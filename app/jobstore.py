"""Job records in Redis: the source of truth for job documents, shared by API and workers.

A record is one hash ``lens:job:<id>``; status changes go through a Lua script
so that a cancel and a worker's start can never both win. Every change is
published on ``lens:events:<id>`` for the server-sent event stream.

Beside the records: ``lens:running`` (job → worker, model, owner, attempt and start
time, for reaping, per-model counts and fair queueing), a set of active (queued or
running) jobs per owner for the quota, the set of owners, and counters and duration
histograms of finished jobs for ``/metrics``.

Events carry only what changed (a status, a progress step), never the record: a record
holds the job's parameters, which may be megabytes, and one oversized message would cut
the API's subscription (Redis' output buffer limit for subscribers) and with it every
stream. Records are stored as compact UTF-8 JSON.

Each run of a job is an attempt (``attempts``: 0, then 1 after a re-queue). A worker's
store remembers the attempt of each job it started, and every write it makes for the job
(progress, the outcome) applies only while the record still names that worker and that
attempt: a run that was presumed lost and resumed later changes nothing.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import redis
import redis.asyncio
from redis.typing import EncodableT, FieldT

from app.keys import (
    FINISHED,
    OWNERS,
    PREFIX,
    RUNNING,
    SUBMITTED,
    active_set,
    events_channel,
    job_key,
    new_job_id,
    owner_index,
    pending_key,
)
from app.schemas import JobDocument, JobError, JobEstimate, JobProgress, JobStatus, TensorInfo

ANONYMOUS = "anonymous"
DURATION_BUCKETS_S = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600)
"""Upper bounds of the job-duration histogram (seconds from start to finish)."""
_JSON_FIELDS = ("params", "progress", "error", "summary", "tensors", "estimate")
_LISTED = (
    *(f for f in JobDocument.model_fields if f not in ("params", "retries", "queue_position")),
    "owner",
    "cancel",
    "worker",
    "attempts",
)
"""The fields a job list reads: the record less its parameters."""

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

# Whether the record (KEYS[1]) is held by a worker in an attempt ('' = any of either).
_HOLDS = """
local function holds(worker, attempt)
  if worker ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= worker then return false end
  if attempt ~= '' and (redis.call('HGET', KEYS[1], 'attempts') or '0') ~= attempt then
    return false
  end
  return true
end
"""

# KEYS[1] = job hash, KEYS[2] = events channel; ARGV[1] = progress JSON, ARGV[2] = event JSON,
# ARGV[3] = the worker, ARGV[4] = its attempt ('' = any). Returns 1 (stop: cancelled, or
# no longer this worker's run) or 0. A cancelled job's step is not published.
_PROGRESS = (
    _HOLDS
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' or not holds(ARGV[3], ARGV[4]) then
  return 1
end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 1 end
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 0
"""
)

# KEYS[1] = job hash, KEYS[2] = events channel, KEYS[3] = running index, optionally
# KEYS[4] = a queue list to take the job from and KEYS[5] = the queue's copy of the job;
# ARGV[1] = worker, ARGV[2] = start time (ISO), ARGV[3] = start time (epoch seconds),
# ARGV[4] = job id. Returns the record's fields (HGETALL), or nil if the job is not queued
# (or not in that queue). The event carries the status and the start time.
_START = """
if KEYS[4] then
  if redis.call('LREM', KEYS[4], 1, ARGV[4]) ~= 1 then return nil end
  redis.call('DEL', KEYS[5])
end
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return nil end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started_at', ARGV[2],
           'started_ts', ARGV[3])
local model, owner, attempts = unpack(redis.call('HMGET', KEYS[1], 'model', 'owner', 'attempts'))
redis.call('HSET', KEYS[3], ARGV[4], cjson.encode({
  worker = ARGV[1], model = model or '', owner = owner or '',
  attempt = tonumber(attempts or '0'), since = tonumber(ARGV[3])}))
redis.call('PUBLISH', KEYS[2],
           cjson.encode({event = 'status', status = 'running', started_at = ARGV[2]}))
return redis.call('HGETALL', KEYS[1])
"""

# The end of a job, with all its bookkeeping: the status change (as _TRANSITION, its
# fields given as one JSON object), the record's expiry, the running index, the owner's
# active set, the finished counter and the duration histogram. The event carries the
# status alone (a summary may be large): streams read the ended record once.
# KEYS[1] = job hash, KEYS[2] = events channel, KEYS[3] = running index, KEYS[4] = finished
# counters; ARGV[1] = JSON list of allowed statuses, ARGV[2] = new status, ARGV[3] = holder
# ('' = any), ARGV[4] = TTL (s), ARGV[5] = end time (epoch s), ARGV[6] = JSON fields,
# ARGV[7] = job id, ARGV[8] = key prefix, ARGV[9] = JSON list of histogram bucket bounds,
# ARGV[10] = the holder's attempt ('' = any).
_FINISH = (
    _HOLDS
    + """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return 0 end
if not holds(ARGV[3], ARGV[10]) then return 0 end
local allowed = false
for _, s in ipairs(cjson.decode(ARGV[1])) do
  if s == current then allowed = true end
end
if not allowed then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for name, value in pairs(cjson.decode(ARGV[6])) do redis.call('HSET', KEYS[1], name, value) end
redis.call('PUBLISH', KEYS[2], cjson.encode({event = 'status', status = ARGV[2]}))
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

# A place in the owner's quota for a new job. KEYS[1] = the owner's active set; ARGV[1] =
# job id, ARGV[2] = quota, ARGV[3] = key prefix, ARGV[4] = how long the place is held
# before the job's record is written (s). At the quota, jobs that ended without leaving
# the set (records flushed by hand, say) are pruned first, but not places reserved for
# records still being written. Returns the count with the new job, or minus the count
# if the quota is full.
_RESERVE = """
local n = redis.call('SCARD', KEYS[1])
local quota = tonumber(ARGV[2])
if n >= quota then
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    local s = redis.call('HGET', ARGV[3] .. ':job:' .. id, 'status')
    local ended = s == 'succeeded' or s == 'failed' or s == 'cancelled'
    if ended or (not s and redis.call('EXISTS', ARGV[3] .. ':pending:' .. id) == 0) then
      redis.call('SREM', KEYS[1], id)
    end
  end
  n = redis.call('SCARD', KEYS[1])
  if n >= quota then return -n end
end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SET', ARGV[3] .. ':pending:' .. ARGV[1], '1', 'EX', ARGV[4])
return n + 1
"""
PENDING_TTL_S = 60
"""A place reserved for a job whose record was never written (its API process died
between the two) is freed after this."""


def now() -> datetime:
    return datetime.now(UTC)


def encode_json(value: Any) -> str:
    """Compact UTF-8 JSON, as records store it (``\\u`` escapes made non-ASCII text up
    to six times larger)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


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
    """An entry of the running index: who runs which attempt since when (epoch seconds,
    the worker's clock)."""

    job_id: str
    worker: str
    model: str
    owner: str = ""
    attempt: int = 0
    since: float | None = None


class JobStore:
    """Reads and writes job records; one instance per Redis connection.

    A worker's store is made with its ``worker`` name: it remembers the attempt of every
    job it starts until the job's outcome is written (:meth:`holding`), and writes progress
    and outcomes only while the record names that worker and attempt, so a run presumed
    lost (its job re-queued elsewhere) cannot overwrite the new run's. ``stop_locally``
    makes ``report_progress`` answer "stop" for a job in this process only, which stops it
    at its next step without touching the record (used on shutdown, when the record has
    already been settled).
    """

    def __init__(self, connection: redis.Redis, worker: str | None = None) -> None:
        self.redis = connection
        self.worker = worker
        self._transition = connection.register_script(_TRANSITION)
        self._progress = connection.register_script(_PROGRESS)
        self._start = connection.register_script(_START)
        self._finish_script = connection.register_script(_FINISH)
        self._stopped: set[str] = set()
        self._held: dict[str, int | None] = {}
        self._lock = threading.Lock()

    def create(
        self,
        *,
        kind: str,
        model: str,
        owner: str,
        params: dict[str, Any],
        pipeline: redis.client.Pipeline | None = None,
        job_id: str | None = None,
        estimate: JobEstimate | None = None,
    ) -> JobDocument:
        """A new queued job's record; written with ``pipeline`` (not executed here) when
        given, so that the caller can enqueue the job in the same transaction. ``job_id``
        is the id a place in the quota was reserved for (:meth:`reserve`); ``estimate``,
        its cost as estimated at submission."""
        job_id = job_id or new_job_id()
        created = now()
        fields = {
            "id": job_id,
            "kind": kind,
            "model": model,
            "owner": owner,
            "status": JobStatus.QUEUED.value,
            "created_at": created.isoformat(),
            "params": encode_json(params),
        }
        if estimate is not None:
            fields["estimate"] = estimate.model_dump_json()
        pipe = pipeline if pipeline is not None else self.redis.pipeline()
        pipe.hset(job_key(job_id), mapping=cast("dict[FieldT, EncodableT]", fields))
        pipe.zadd(owner_index(owner), {job_id: created.timestamp()})
        pipe.sadd(OWNERS, owner)
        pipe.sadd(active_set(owner), job_id)
        pipe.delete(pending_key(job_id))
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

    def get_many(self, job_ids: list[str], *, params: bool = True) -> list[JobRecord | None]:
        """The records of ``job_ids`` (None for each that has none), in one round trip;
        without their parameters (which may be megabytes each) unless ``params``."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            if params:
                pipe.hgetall(job_key(job_id))
            else:
                pipe.hmget(job_key(job_id), _LISTED)
        replies = pipe.execute()
        if params:
            return [self.record_of(raw) for raw in replies]
        return [
            self.record_of({k.encode(): v for k, v in zip(_LISTED, values, strict=True) if v})
            for values in replies
        ]

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
        self._hold([job_id], worker)
        started = self._started(self._start_script(job_id, worker, unqueue))
        self._held_as([(job_id, started)], worker)
        return started

    def start_many(
        self, worker: str, jobs: Sequence[tuple[str, tuple[str, str] | None]]
    ) -> list[JobRecord | None]:
        """:meth:`start` for each (job id, unqueue) of ``jobs``, in one round trip; each
        start is atomic on its own."""
        pipe = self.redis.pipeline(transaction=False)
        self._hold([job_id for job_id, _ in jobs], worker)
        for job_id, unqueue in jobs:
            self._start_script(job_id, worker, unqueue, client=pipe)
        started = [self._started(flat) for flat in pipe.execute()]
        self._held_as([(job_id, r) for (job_id, _), r in zip(jobs, started, strict=True)], worker)
        return started

    def _hold(self, job_ids: list[str], worker: str) -> None:
        """Count jobs as this worker's before their start time is taken, so that a
        snapshot of :meth:`holding` taken after a job's start always lists it."""
        if worker == self.worker:
            with self._lock:
                self._held.update(dict.fromkeys(job_ids))

    def _held_as(self, started: list[tuple[str, JobRecord | None]], worker: str) -> None:
        if worker != self.worker:
            return
        with self._lock:
            for job_id, record in started:
                if record is None:
                    self._held.pop(job_id, None)
                else:
                    self._held[job_id] = record.attempts

    def _release(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)

    def holding(self) -> dict[str, Any]:
        """The jobs this worker runs now and when that was true (epoch seconds), for its
        heartbeat: the reaper settles a job the record gives to a live worker that does
        not list it (its outcome never reached Redis)."""
        with self._lock:
            return {"jobs": sorted(self._held), "at": time.time()}

    def attempt_of(self, job_id: str) -> int | None:
        """The attempt of a job this worker started (None: not one of its jobs)."""
        with self._lock:
            return self._held.get(job_id)

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
            jobs.append(
                RunningJob(
                    raw_id.decode(),
                    value["worker"],
                    value["model"],
                    owner=value.get("owner", ""),
                    attempt=int(value.get("attempt", 0)),
                    since=value.get("since"),
                )
            )
        return jobs

    def running_counts(self) -> Counter[str]:
        """Running jobs per model."""
        return Counter(job.model for job in self.running())

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
        if job.worker == self.worker:
            self._release(job.job_id)
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
        """End a running job (held by this store's worker in the attempt it started, if
        it has a worker); True if this ended it. The job is no longer this worker's
        either way."""
        fields: dict[str, Any] = {}
        if error is not None:
            fields["error"] = error.model_dump()
        if summary is not None:
            fields["summary"] = summary
        if tensors is not None:
            fields["tensors"] = {k: v.model_dump() for k, v in tensors.items()}
        ended = self._finish(
            job_id, status, fields, ttl_s, holder=self.worker, attempt=self.attempt_of(job_id)
        )
        self._release(job_id)
        return ended

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
        attempt: int | None = None,
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
            "" if attempt is None else str(attempt),
        ]
        return bool(self._finish_script(keys=keys, args=argv))

    def request_cancel(self, job_id: str) -> None:
        self.redis.hset(job_key(job_id), "cancel", "1")

    def stop_locally(self, job_id: str) -> None:
        self._stopped.add(job_id)

    def report_progress(self, job_id: str, progress: JobProgress) -> bool:
        """Store and publish a running job's progress, unless its cancellation was
        requested or the record is no longer this worker's run: then return True (stop)
        and publish nothing. One round trip per report, which a fit pays at every update."""
        if job_id in self._stopped:
            return True
        event = json.dumps({"event": "progress", **progress.model_dump()})
        keys = [job_key(job_id), events_channel(job_id)]
        attempt = self.attempt_of(job_id)
        argv = [
            progress.model_dump_json(),
            event,
            self.worker or "",
            "" if attempt is None else str(attempt),
        ]
        return bool(self._progress(keys=keys, args=argv))

    def reserve(self, owner: str, job_id: str, quota: int) -> int:
        """A place in ``owner``'s quota of active jobs for ``job_id``, counted atomically
        (a burst of submissions cannot get past it): the count with this job, or minus
        the count if the quota is full. :meth:`create` then writes the record."""
        return int(cast(int, reserve_with(self.redis, owner, job_id, quota)))

    def active_count(self, owner: str) -> int:
        """The owner's queued and running jobs (every end of a job leaves the set in the
        same script, so its size is the count; :meth:`reserve` prunes it at the quota)."""
        return cast(int, self.redis.scard(active_set(owner)))

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
        return encode_json(value)
    return str(value)


def reserve_with(client: Any, owner: str, job_id: str, quota: int) -> Any:
    """:meth:`JobStore.reserve` on ``client``, a connection or a pipeline (sync or
    asyncio; EVAL: a pipeline would first ask whether a registered script is loaded)."""
    return client.eval(_RESERVE, 1, active_set(owner), job_id, quota, PREFIX, PENDING_TTL_S)


def unreserve_with(client: Any, owner: str, job_id: str) -> None:
    """Give back, as part of ``client``'s pipeline, a place reserved for a job that was
    not created after all."""
    client.srem(active_set(owner), job_id)
    client.delete(pending_key(job_id))
