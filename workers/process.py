"""A lens worker process: loads its models once, then takes jobs from their queues.

RQ's default worker forks a child per job, which would reload models every job
and cannot carry CUDA across the fork; this one runs jobs in its own process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from app import queue
from app.blobstore import BlobStore
from app.core.config import Settings
from app.jobstore import JobStore
from workers import tasks
from workers.registry import ModelRegistry, describe

log = logging.getLogger(__name__)


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class _Heartbeat(threading.Thread):
    """Reports this worker alive and fails the jobs of workers that stopped reporting."""

    def __init__(
        self, settings: Settings, name: str, info: Callable[[], dict[str, Any]], store: JobStore
    ) -> None:
        super().__init__(name="lens-heartbeat", daemon=True)
        self.settings, self.worker, self.info, self.store = settings, name, info, store
        self.stopped = threading.Event()

    def beat(self) -> None:
        conn = self.store.redis
        queue.heartbeat(conn, self.worker, self.info(), ttl_s=3 * self.settings.heartbeat_s)
        reaped = self.store.reap_orphans(set(queue.live_workers(conn)), self.settings.result_ttl_s)
        for job_id in reaped:
            log.warning("job %s: its worker died; marked failed", job_id)

    def run(self) -> None:
        while not self.stopped.wait(self.settings.heartbeat_s):
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)


def run_worker(
    settings: Settings,
    models: list[str] | None = None,
    name: str | None = None,
    *,
    burst: bool = False,
) -> None:
    """Load ``models`` (default: all served), then work their queues until told to stop."""
    names = models or sorted(settings.models)
    unknown = [m for m in names if m not in settings.models]
    if unknown:
        raise ValueError(
            f"models {unknown} are not configured; configured: {sorted(settings.models)}"
        )
    name = name or default_worker_name()
    conn = redis.Redis.from_url(settings.redis_url)
    store = JobStore(conn)
    registry = ModelRegistry({m: settings.models[m] for m in names})
    for model in names:
        queue.publish_model_info(conn, model, describe(model, registry.get(model)))
    tasks.install(
        tasks.Runtime(
            worker_name=name,
            registry=registry,
            store=store,
            blobs=BlobStore(settings.blob_dir),
            dataset_dir=settings.dataset_dir,
            result_ttl_s=settings.result_ttl_s,
        )
    )
    since = time.time()

    def info() -> dict[str, Any]:
        return {
            "models": names,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": since,
            "loads": dict(registry.load_counts),
        }

    heartbeat = _Heartbeat(settings, name, info, store)
    heartbeat.beat()
    heartbeat.start()
    worker = SimpleWorker(
        [queue.model_queue(conn, m) for m in names],
        name=name,
        connection=conn,
        serializer=JSONSerializer,
    )
    log.info("worker %s ready: models %s", name, names)
    try:
        worker.work(burst=burst, logging_level="WARNING", with_scheduler=False)
    finally:
        heartbeat.stopped.set()
        queue.remove_worker(conn, name)
