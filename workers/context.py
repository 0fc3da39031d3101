"""What a job handler gets: its model, its progress channel and access to earlier results."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import redis
import torch
from safetensors import safe_open

from app.blobstore import BlobStore
from app.datasets import DatasetStore
from app.jobstore import JobStore
from app.schemas import JobProgress
from workers.lens.errors import Cancelled, InvalidParameter
from workers.lens.loading import LoadedModel
from workers.lens.results import Progress

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 5.0


def until_redis_answers(write: Callable[[], T], what: str) -> T:
    """``write``, tried again until Redis answers: a job's progress and outcome are kept,
    not lost, while Redis is down or restarting (a job left ``running`` under a live
    worker would never end). Errors other than Redis being unreachable go up."""
    delay = RETRY_FIRST_S
    while True:
        try:
            return write()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("%s: Redis unavailable (%s); trying again in %.1f s", what, exc, delay)
            time.sleep(delay)
            delay = min(2 * delay, RETRY_MAX_S)


@dataclass
class JobContext:
    job_id: str
    owner: str
    lm: LoadedModel
    store: JobStore
    blob_dir: Path
    dataset_dir: Path
    between_steps: Callable[[], None] | None = None
    """Called after each step's report (a fit serves queued short jobs there:
    :mod:`workers.fit_pauses`)."""

    def progress(self, report: Progress) -> None:
        """Publish progress; stop the job here if its owner cancelled it."""
        progress = JobProgress(
            stage=report.stage, step=report.step, total=report.total, loss=report.loss
        )
        stop = until_redis_answers(
            lambda: self.store.report_progress(self.job_id, progress),
            f"job {self.job_id}: progress",
        )
        if stop:
            raise Cancelled(f"job {self.job_id} was cancelled (or is no longer this worker's)")
        if self.between_steps is not None:
            self.between_steps()

    def dataset(self, field: str, dataset_id: str) -> tuple[list[str], list[str]]:
        """Prompts and targets of an uploaded data set (the API checked it exists and is ours)."""
        found = DatasetStore(self.dataset_dir).prompts_and_targets(dataset_id)
        if found is None:
            raise InvalidParameter(field, f"data set {dataset_id!r} not found")
        return found

    def job_tensors(
        self, field: str, job_id: str, names: tuple[str, ...]
    ) -> dict[str, torch.Tensor]:
        """Tensors of an earlier job's result (the API checked owner, kind and model),
        from the file of the attempt its record names."""
        record = self.store.get(job_id)
        path = BlobStore(self.blob_dir).path(job_id, record.attempts if record else 0)
        if not path.is_file():
            raise InvalidParameter(field, f"the result of job {job_id!r} is gone (expired?)")
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}
