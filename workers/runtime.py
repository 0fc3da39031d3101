"""What a worker process holds while it runs jobs: its resident models, its stores, its
limits, the claimer of queued short jobs and the shared-pass counters its heartbeat
exports. :func:`workers.tasks.install` makes it the one ``run_job`` uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from app.blobstore import BlobStore
from app.core.config import Limits
from app.jobstore import JobStore
from workers.claim import Claimer
from workers.registry import ModelRegistry


@dataclass
class BatchStats:
    """Shared forward passes of score and trace jobs, for the worker's heartbeat."""

    passes: int = 0
    jobs: int = 0
    batched_jobs: int = 0
    largest: int = 0
    in_fit_pauses: int = 0
    """Jobs run by a fit's pauses (:mod:`workers.fit_pauses`)."""

    def record(self, jobs: int) -> None:
        self.passes += 1
        self.jobs += jobs
        self.batched_jobs += jobs if jobs > 1 else 0
        self.largest = max(self.largest, jobs)


@dataclass
class Runtime:
    worker_name: str
    registry: ModelRegistry
    store: JobStore
    blobs: BlobStore
    dataset_dir: Path
    result_ttl_s: int
    batching: BatchStats = field(default_factory=BatchStats)
    limits: Limits = field(default_factory=Limits)
    claims: Claimer = field(init=False)

    def __post_init__(self) -> None:
        self.claims = Claimer(self.worker_name, self.store, self.limits, self.dataset_dir)
