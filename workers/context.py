"""What a job handler gets: its model, its progress channel and access to earlier results."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from app.blobstore import BlobStore
from app.jobstore import JobStore
from app.schemas import JobProgress
from workers.lens.errors import Cancelled, InvalidParameter
from workers.lens.loading import LoadedModel
from workers.lens.results import Progress


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
        if self.store.report_progress(self.job_id, progress):
            raise Cancelled(f"job {self.job_id} was cancelled")
        if self.between_steps is not None:
            self.between_steps()

    def dataset(self, field: str, dataset_id: str) -> tuple[list[str], list[str]]:
        """Prompts and targets of an uploaded data set (the API checked it exists and is ours)."""
        path = self.dataset_dir / f"{dataset_id}.json"
        if len(dataset_id) != 32 or not path.is_file():
            raise InvalidParameter(field, f"data set {dataset_id!r} not found")
        rows = json.loads(path.read_text())
        return [r["prompt"] for r in rows], [r["target"] for r in rows]

    def job_tensors(
        self, field: str, job_id: str, names: tuple[str, ...]
    ) -> dict[str, torch.Tensor]:
        """Tensors of an earlier job's result (the API checked owner, kind and model)."""
        path = BlobStore(self.blob_dir).path(job_id)
        if not path.is_file():
            raise InvalidParameter(field, f"the result of job {job_id!r} is gone (expired?)")
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}
