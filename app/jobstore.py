"""Job records in Redis: the source of truth for job documents, shared by API and workers.

A record is one hash ``lens:job:<id>``; status changes go through a Lua script
so that a cancel and a worker's start can never both win. Every change is
published on ``lens:events:<id>`` for the server-sent event stream.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from app.schemas import JobDocument, JobError, JobProgress, JobStatus, TensorInfo

PREFIX = "lens"
ANONYMOUS = "anonymous"
RUNNING = f"{PREFIX}:running"
_JSON_FIELDS = ("params", "progress", "error", "summary", "tensors")

# KEYS[1] = job hash, KEYS[2] = events channel; ARGV[1] = JSON list of allowed current
# statuses, ARGV[2] = new status, ARGV[3..] = field/value pairs to set alongside.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return 0 end
local allowed = cjson.decode(ARGV[1])
for _, s in ipairs(allowed) do
  if s == current then
    redis.call('HSET', KEYS[1], 'status', ARGV[2])
    for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    redis.call('PUBLISH', KEYS[2], cjson.encode({event = 'status', status = ARGV[2]}))
    return 1
  end
end
return 0
"""


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


@dataclass(frozen=True)
class JobRecord:
    """A job as stored: its public document plus who owns it."""

    document: JobDocument
    owner: str
    cancel_requested: bool
    worker: str | None


class JobStore:
    """Reads and writes job records; one instance per Redis connection."""

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection
        self._transition = connection.register_script(_TRANSITION)

    def create(self, *, kind: str, model: str, owner: str, params: dict[str, Any]) -> JobDocument:
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
        pipe = self.redis.pipeline()
        pipe.hset(job_key(job_id), mapping=fields)
        pipe.zadd(owner_index(owner), {job_id: created.timestamp()})
        pipe.execute()
        return self._document(fields)

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(job_key(job_id))
        if not raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        return JobRecord(
            document=self._document(fields),
            owner=fields["owner"],
            cancel_requested=fields.get("cancel") == "1",
            worker=fields.get("worker"),
        )

    def params(self, job_id: str) -> dict[str, Any]:
        raw = self.redis.hget(job_key(job_id), "params")
        return json.loads(raw) if raw else {}

    def transition(
        self, job_id: str, allowed: Iterable[JobStatus], new: JobStatus, **fields: Any
    ) -> bool:
        """Move to ``new`` only if the current status is one of ``allowed``; True if it moved."""
        argv: list[str] = [json.dumps([s.value for s in allowed]), new.value]
        for name, value in fields.items():
            argv += [name, _encode(name, value)]
        keys = [job_key(job_id), events_channel(job_id)]
        return bool(self._transition(keys=keys, args=argv))

    def start(self, job_id: str, worker: str) -> bool:
        moved = self.transition(
            job_id, [JobStatus.QUEUED], JobStatus.RUNNING, started_at=now(), worker=worker
        )
        if moved:
            self.redis.hset(RUNNING, job_id, worker)
        return moved

    def reap_orphans(self, alive: set[str], ttl_s: int) -> list[str]:
        """Fail running jobs whose worker stopped beating; returns their ids."""
        reaped = []
        for raw_id, raw_worker in self.redis.hgetall(RUNNING).items():
            job_id, worker = raw_id.decode(), raw_worker.decode()
            if worker in alive:
                continue
            error = JobError(
                type="WorkerLost",
                message=f"worker {worker} stopped (killed, crashed or its host went down) "
                "while running this job",
            )
            if self.finish(job_id, JobStatus.FAILED, error=error, ttl_s=ttl_s):
                reaped.append(job_id)
            self.redis.hdel(RUNNING, job_id)
        return reaped

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
        fields: dict[str, Any] = {"finished_at": now()}
        if error is not None:
            fields["error"] = error.model_dump()
        if summary is not None:
            fields["summary"] = summary
        if tensors is not None:
            fields["tensors"] = {k: v.model_dump() for k, v in tensors.items()}
        moved = self.transition(job_id, [JobStatus.QUEUED, JobStatus.RUNNING], status, **fields)
        if moved:
            pipe = self.redis.pipeline(transaction=False)
            pipe.expire(job_key(job_id), ttl_s)
            pipe.hdel(RUNNING, job_id)
            pipe.execute()
        return moved

    def request_cancel(self, job_id: str) -> None:
        self.redis.hset(job_key(job_id), "cancel", "1")

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(job_key(job_id), "cancel") == b"1"

    def set_progress(self, job_id: str, progress: JobProgress) -> None:
        data = progress.model_dump_json()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(job_key(job_id), "progress", data)
        pipe.publish(
            events_channel(job_id), json.dumps({"event": "progress", **progress.model_dump()})
        )
        pipe.execute()

    def list_ids(self, owner: str, limit: int, offset: int = 0) -> list[str]:
        """The owner's job ids, newest first; expired records are pruned from the index."""
        ids = [
            i.decode() for i in self.redis.zrevrange(owner_index(owner), offset, offset + limit - 1)
        ]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(job_key(job_id))
        alive = pipe.execute()
        dead = [i for i, ok in zip(ids, alive, strict=True) if not ok]
        if dead:
            self.redis.zrem(owner_index(owner), *dead)
        return [i for i, ok in zip(ids, alive, strict=True) if ok]

    @staticmethod
    def _document(fields: dict[str, str]) -> JobDocument:
        data: dict[str, Any] = {k: v for k, v in fields.items() if k in JobDocument.model_fields}
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
