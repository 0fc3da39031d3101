"""A worker's runtime in this process, on a tiny model and the real Redis, for the tests of
what ``workers.tasks`` does around the analysis core (claims, shared passes, fit pauses)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from app import queue
from app.blobstore import BlobStore
from app.core.config import ModelSpec
from app.jobstore import JobStore
from tests.integration.test_batching import MODEL
from workers import tasks
from workers.lens.testing import build_tiny_model
from workers.registry import ModelRegistry


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    """The tiny Llama, served as ``MODEL`` on the CPU."""
    path = build_tiny_model("llama", tmp_path_factory.mktemp("tiny"))
    return ModelRegistry({MODEL: ModelSpec(source=str(path), device="cpu", dtype="float32")})


@pytest.fixture
def runtime(
    redis_conn: redis.Redis,
    tiny_registry: ModelRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tasks.Runtime]:
    """This process as the worker ``this-worker``: its runtime installed for ``run_job``,
    and one torch thread, as a worker sharing this small machine gets."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rt = tasks.Runtime(
        worker_name="this-worker",
        registry=tiny_registry,
        store=JobStore(redis_conn),
        blobs=BlobStore(tmp_path / "blobs"),
        dataset_dir=tmp_path / "datasets",
        result_ttl_s=3600,
    )
    monkeypatch.setattr(tasks, "_runtime", rt)
    yield rt
    torch.set_num_threads(threads)


def submit(rt: tasks.Runtime, job: Any) -> str:
    """What POST /v1/jobs does once the request is valid: a record, then the RQ job."""
    params = job.model_dump(mode="json", exclude={"kind", "model"})
    doc = rt.store.create(kind=job.kind, model=MODEL, owner="someone", params=params)
    queue.enqueue(rt.store.redis, MODEL, doc.id, timeout_s=600)
    return doc.id
