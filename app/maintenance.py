"""Housekeeping shared by the API and the workers: lost jobs and expired results.

Reaping runs in every worker's heartbeat and in the API, so a dead worker's job is
settled even when no worker is left: a worker silent for 3 beats has lost its
heartbeat key, and the next reaping pass (at most one beat later) fails or re-queues
its jobs; the bound is 4 × ``heartbeat_s`` after the death (20 s by default).

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

import redis

from app import queue
from app.blobstore import BlobStore
from app.core.config import Settings
from app.jobstore import PREFIX, JobStore, RunningJob
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
    """Settle the running jobs of workers that stopped beating; returns their ids."""
    alive = set(queue.live_workers(store.redis))
    lost = store.orphans(alive)
    return [job.job_id for job in lost if settle(store, settings, job, worker_lost(job))]


class Reaper:
    """Reaps lost jobs, except just after a Redis outage: heartbeats could not be written
    during it, so live workers look dead until their next beat. Reaping resumes one
    worker lifetime (3 beats) after the outage was noticed."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store, self.settings = store, settings
        self._resume_at = 0.0

    def outage(self) -> None:
        self._resume_at = time.monotonic() + self.settings.worker_ttl_s

    def __call__(self) -> list[str]:
        if time.monotonic() < self._resume_at:
            return []
        return reap_lost_jobs(self.store, self.settings)


@dataclass(frozen=True)
class SweepReport:
    blobs: int = 0
    temps: int = 0
    datasets: int = 0
    index_entries: int = 0


def dataset_key(dataset_id: str) -> str:
    return f"{PREFIX}:dataset:{dataset_id}"


def sweep(
    store: JobStore, blobs: BlobStore, dataset_dir: Path, *, keep_index_s: float
) -> SweepReport:
    """Delete blobs and data sets whose record has expired, stale temporary files, and
    owner-index entries of expired jobs older than ``keep_index_s``."""
    conn = store.redis
    removed_blobs = removed_temps = removed_sets = 0
    cutoff = time.time() - TEMP_GRACE_S
    if blobs.root.is_dir():
        for path in blobs.root.glob("*/*"):
            if path.name.startswith("."):
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    removed_temps += 1
            elif path.suffix == ".safetensors" and not store.exists(path.stem):
                path.unlink(missing_ok=True)
                removed_blobs += 1
    if dataset_dir.is_dir():
        for path in dataset_dir.glob("*.json"):
            if not conn.exists(dataset_key(path.stem)):
                path.unlink(missing_ok=True)
                removed_sets += 1
    pruned = sum(
        store.prune_index(key.decode(), time.time() - keep_index_s)
        for key in conn.scan_iter(match=f"{PREFIX}:jobs:*", count=100)
    )
    return SweepReport(removed_blobs, removed_temps, removed_sets, pruned)


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
