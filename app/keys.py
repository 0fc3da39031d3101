"""Every Redis key the service uses, and the job-id pattern: one place, so that the API,
the workers and the sweeper cannot disagree on a name.

Each builder says what the key holds; the modules that read and write them (the job
store, the queues, the worker registry, the data set store) import from here.
"""

from __future__ import annotations

import re
import secrets

PREFIX = "lens"

JOB_ID_FORM = r"[0-9a-f]{32}"
"""A job id: 128 random bits in hex (data set ids have the same form)."""
JOB_ID = re.compile(rf"^{JOB_ID_FORM}$")

RUNNING = f"{PREFIX}:running"
"""Sorted set: running job ids, scored by their worker's lease expiry."""
OWNERS = f"{PREFIX}:owners"
"""Set: every owner that has submitted a job (the sweeper prunes their indexes)."""
SUBMITTED = f"{PREFIX}:stats:submitted"
FINISHED = f"{PREFIX}:stats:finished"
MODELS = f"{PREFIX}:models"
"""Hash: served model name → its published ``ModelInfo`` JSON."""
WORKERS = f"{PREFIX}:workers"
"""Sorted set: every worker that has beaten, scored by when its beat expires (ms)."""


def is_job_id(value: str) -> bool:
    return JOB_ID.match(value) is not None


def new_job_id() -> str:
    """An unguessable job id (128 random bits)."""
    return secrets.token_hex(16)


def job_key(job_id: str) -> str:
    """Hash: the job's record."""
    return f"{PREFIX}:job:{job_id}"


def events_channel(job_id: str) -> str:
    """Pub/sub channel of the job's status and progress events."""
    return f"{PREFIX}:events:{job_id}"


def owner_index(owner: str) -> str:
    """Sorted set: the owner's job ids by submission time."""
    return f"{PREFIX}:jobs:{owner}"


def active_set(owner: str) -> str:
    """Set: the owner's queued and running jobs (the quota)."""
    return f"{PREFIX}:active:{owner}"


def duration_key(kind: str) -> str:
    return f"{PREFIX}:stats:duration:{kind}"


def pending_key(job_id: str) -> str:
    """A quota place reserved for a job whose record is being written."""
    return f"{PREFIX}:pending:{job_id}"


def queue_name(model: str) -> str:
    """The RQ queue of a served model (RQ prefixes its own namespace to it)."""
    return f"{PREFIX}.{model}"


def submitting_key(model: str, kind: str) -> str:
    return f"{PREFIX}:submitting:{model}:{kind}"


def worker_key(worker: str) -> str:
    """String with expiry: a worker's heartbeat and what it reported."""
    return f"{PREFIX}:worker:{worker}"


def tokenizer_key(sha256: str) -> str:
    """A published tokenizer, by the hash of its content (``ModelInfo.tokenizer_sha256``):
    models that share one share the key."""
    return f"{PREFIX}:tokenizer:{sha256}"


def dataset_key(dataset_id: str) -> str:
    """Hash with expiry: an uploaded data set's owner and size; the file lives while it does."""
    return f"{PREFIX}:dataset:{dataset_id}"


def owner_datasets(owner: str) -> str:
    """Hash: the owner's data set ids → bytes (the data set quota)."""
    return f"{PREFIX}:datasets:{owner}"
