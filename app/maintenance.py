"""Housekeeping shared by the API and the workers: lost jobs and expired results.

Reaping runs in every worker's heartbeat and in the API, so a dead worker's job is
settled even when no worker is left: a worker silent for 3 beats has lost its
heartbeat key, and the next reaping pass (at most one beat later) fails or re-queues
its jobs; the bound is 4 × ``heartbeat_s`` after the death (20 s by default). A live
worker lists in its heartbeat the jobs it runs: a job the running index gives it that
it did not list, though it had started before the list was taken, has lost its outcome
(it never reached Redis) and is settled too. Reaping reads the running index and the
workers' index, never the whole keyspace.

Sweeping runs in the API: Redis expires a finished job's record after
``result_ttl_s``; the sweeper then deletes the blob of every job whose record is gone,
and the data sets whose record is gone, so disk use follows the records.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from app import presence, queue
from app.blobstore import BlobStore, job_of
from app.core.config import Settings
from app.datasets import DatasetStore
from app.jobstore import JobStore, RunningJob
from app.keys import OWNERS, owner_index
from app.logs import job_context
from app.schemas import JobError

log = logging.getLogger(__name__)

TEMP_GRACE_S = 3600.0
"""A temporary blob older than this belongs to a write that will never finish."""


def worker_lost(job: RunningJob) -> JobError:
    return JobError(
        type="WorkerLost",
        message=f"worker {job.worker} stopped (killed, crashed or its host went down) "
        "while running this job; submit it again",
    )


def outcome_lost(job: RunningJob) -> JobError:
    return JobError(
        type="WorkerLost",
        message=f"worker {job.worker} is no longer running this job and its outcome never "
        "reached the job store; submit it again",
    )


def settle(store: JobStore, settings: Settings, job: RunningJob, error: JobError) -> str | None:
    """Fail a job whose run ended without an outcome, or re-queue it once when the
    operator allows retries."""
    with job_context(job.job_id):
        outcome = store.give_up(
            job, error, retry=settings.retry_lost_jobs, ttl_s=settings.result_ttl_s
        )
        if outcome == "requeued":
            queue.enqueue(store.redis, job.model, job.job_id, settings.job_timeout_s)
            log.warning("re-queued after %s: %s", error.type, error.message)
        elif outcome == "failed":
            log.warning("failed: %s: %s", error.type, error.message)
    return outcome


def reap_lost_jobs(store: JobStore, settings: Settings) -> list[str]:
    """Settle the running jobs of workers that stopped beating, and those a live worker
    does not run; returns their ids."""
    workers = presence.live_workers(store.redis)
    settled = []
    for job in store.running():
        info = workers.get(job.worker)
        if info is None:
            error = worker_lost(job)
        elif _not_running(job, info):
            error = outcome_lost(job)
        else:
            continue
        if settle(store, settings, job, error):
            settled.append(job.job_id)
    return settled


def _not_running(job: RunningJob, info: dict[str, Any]) -> bool:
    """Whether the worker's heartbeat shows it is not running ``job``: the list of its
    jobs, taken after the job started (both times by the worker's clock), lacks it."""
    holding = info.get("holding")
    if not isinstance(holding, dict) or job.since is None:
        return False
    return job.since < float(holding.get("at", 0)) and job.job_id not in holding.get("jobs", [])


SLOW_ANSWER_S = 1.0
"""A Redis that takes longer than this (or a beat, if longer) to answer was away: the
client retried until it came back."""


class Reaper:
    """Reaps lost jobs, except just after a Redis outage: heartbeats could not be written
    during it, so live workers look dead until their next beat. Reaping resumes one
    worker lifetime (3 beats) after the outage was noticed: an error, an answer so slow
    that the client must have retried meanwhile, or a round that came late (its caller
    was held up in such retries). Nor does it reap while Redis has been up for less than
    a worker lifetime (a restart loses the heartbeats, whose keys expire by then)."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store, self.settings = store, settings
        self._resume_at = 0.0
        self._last: float | None = None

    def outage(self) -> None:
        self._resume_at = time.monotonic() + self.settings.worker_ttl_s

    def __call__(self) -> list[str]:
        now, last, self._last = time.monotonic(), self._last, time.monotonic()
        slow = max(SLOW_ANSWER_S, self.settings.heartbeat_s)
        if last is not None and now - last > 2 * self.settings.heartbeat_s + slow:
            self.outage()
        if now < self._resume_at:
            return []
        asked = time.monotonic()
        uptime = float(self.store.redis.info("server").get("uptime_in_seconds", 0))
        if time.monotonic() - asked > slow:
            self.outage()
            return []
        if uptime < self.settings.worker_ttl_s:
            return []
        return reap_lost_jobs(self.store, self.settings)


@dataclass(frozen=True)
class SweepReport:
    blobs: int = 0
    temps: int = 0
    datasets: int = 0
    index_entries: int = 0


def sweep(
    store: JobStore, blobs: BlobStore, dataset_dir: Path, *, keep_index_s: float
) -> SweepReport:
    """Delete blobs and data sets whose record has expired, stale temporary files (of
    blobs and of data sets), and owner-index entries of expired jobs older than
    ``keep_index_s``."""
    conn = store.redis
    removed_blobs = removed_temps = removed_sets = 0
    cutoff = time.time() - TEMP_GRACE_S
    if blobs.root.is_dir():
        for path in blobs.root.glob("*/*"):
            if path.name.startswith("."):
                removed_temps += _unlink_older(path, cutoff)
            elif path.suffix == ".safetensors" and not store.exists(job_of(path.name)):
                path.unlink(missing_ok=True)
                removed_blobs += 1
    datasets = DatasetStore(dataset_dir)
    for path in datasets.temp_files():
        removed_temps += _unlink_older(path, cutoff)
    for path in datasets.expired(conn):
        path.unlink(missing_ok=True)
        removed_sets += 1
    pruned = sum(
        store.prune_index(owner_index(owner.decode()), time.time() - keep_index_s)
        for owner in conn.sscan_iter(OWNERS, count=100)
    )
    return SweepReport(removed_blobs, removed_temps, removed_sets, pruned)


def _unlink_older(path: Path, cutoff: float) -> int:
    """Remove a file last written before ``cutoff`` (a write that will never finish)."""
    try:
        if path.stat().st_mtime >= cutoff:
            return 0
    except FileNotFoundError:
        return 0
    path.unlink(missing_ok=True)
    return 1


async def run_housekeeping(store: JobStore, blobs: BlobStore, settings: Settings) -> None:
    """The API's loop: reap every beat, sweep every ``sweep_interval_s``; survives Redis
    outages (it logs and tries again next round)."""
    next_sweep = 0.0
    reap = Reaper(store, settings)
    while True:
        try:
            await asyncio.to_thread(reap)
            if time.monotonic() >= next_sweep:
                report = await asyncio.to_thread(
                    sweep, store, blobs, settings.dataset_dir, keep_index_s=settings.result_ttl_s
                )
                next_sweep = time.monotonic() + settings.sweep_interval_s
                if report != SweepReport():
                    log.info("swept expired results: %s", report)
        except redis.RedisError as exc:
            reap.outage()
            log.warning("housekeeping skipped, Redis unavailable: %s", exc)
        except Exception:
            log.exception("housekeeping failed; trying again next round")
        await asyncio.sleep(settings.heartbeat_s)
