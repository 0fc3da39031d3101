"""Prometheus metrics, read from Redis at scrape time.

Workers are separate processes (often on other hosts), so the API does not count
anything itself: the job store keeps counters and duration histograms in Redis as
jobs end, workers publish what they hold in their heartbeats, and this collector
turns both into metric families whenever ``/metrics`` is scraped. Any API replica
gives the same answer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from app import presence, queue
from app.jobstore import DURATION_BUCKETS_S, JobStore
from app.keys import FINISHED, SUBMITTED, duration_key
from app.schemas import JobKind

log = logging.getLogger(__name__)


class LensCollector(Collector):
    """Jobs, queues, workers, models and GPU memory of the whole service."""

    def __init__(self, store: JobStore, models: list[str]) -> None:
        self.store = store
        self.models = models

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("lens_redis_up", "1 if Redis answered this scrape, else 0.")
        try:
            families = list(self._families())
        except redis.RedisError as exc:
            log.warning("metrics: Redis unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
        conn = self.store.redis
        yield from self._job_families(conn)
        running = self.store.running_counts()
        depth = GaugeMetricFamily("lens_queue_depth", "Jobs queued per model.", labels=["model"])
        busy = GaugeMetricFamily("lens_jobs_running", "Jobs running per model.", labels=["model"])
        for model in self.models:
            depth.add_metric([model], queue.queue_depth(conn, model))
            busy.add_metric([model], running.get(model, 0))
        yield depth
        yield busy
        yield from self._worker_families(presence.live_workers(conn))

    def _job_families(self, conn: redis.Redis) -> Iterator[Metric]:
        submitted = CounterMetricFamily(
            "lens_jobs_submitted", "Jobs accepted, by kind.", labels=["kind"]
        )
        for kind, n in sorted(_decoded(conn.hgetall(SUBMITTED)).items()):
            submitted.add_metric([kind], float(n))
        yield submitted
        finished = CounterMetricFamily(
            "lens_jobs_finished", "Jobs ended, by kind and final status.", labels=["kind", "status"]
        )
        for key, n in sorted(_decoded(conn.hgetall(FINISHED)).items()):
            kind, _, status = key.partition(":")
            finished.add_metric([kind, status], float(n))
        yield finished
        durations = HistogramMetricFamily(
            "lens_job_duration_seconds",
            "Seconds from a job's start to its end, by kind.",
            labels=["kind"],
        )
        for kind in JobKind:
            raw = _decoded(conn.hgetall(duration_key(kind.value)))
            if not raw:
                continue
            buckets = [(_bound(b), float(raw.get(str(b), 0))) for b in DURATION_BUCKETS_S]
            buckets.append(("+Inf", float(raw.get("+Inf", 0))))
            durations.add_metric([kind.value], buckets, sum_value=float(raw.get("sum", 0)))
        yield durations

    def _worker_families(self, workers: dict[str, dict[str, Any]]) -> Iterator[Metric]:
        count = GaugeMetricFamily("lens_workers", "Workers whose heartbeat is current.")
        count.add_metric([], len(workers))
        yield count
        resident = GaugeMetricFamily(
            "lens_model_resident", "Live workers holding the model loaded.", labels=["model"]
        )
        load = GaugeMetricFamily(
            "lens_model_load_seconds",
            "Seconds the model's last load took, per worker.",
            labels=["model", "worker"],
        )
        gpu = {
            name: GaugeMetricFamily(
                f"lens_gpu_memory_{name}_bytes",
                f"CUDA memory {name} per worker and device.",
                labels=["worker", "device"],
            )
            for name in ("allocated", "reserved", "total")
        }
        for model in self.models:
            resident.add_metric(
                [model], sum(model in w.get("resident", []) for w in workers.values())
            )
        for worker, info in sorted(workers.items()):
            for model, seconds in sorted(info.get("load_seconds", {}).items()):
                load.add_metric([model, worker], seconds)
            for device in info.get("gpus", []):
                for name, family in gpu.items():
                    family.add_metric([worker, device["device"]], device[name])
        yield resident
        yield load
        yield from gpu.values()


def _decoded(raw: dict[Any, Any]) -> dict[str, str]:
    """A Redis hash read without ``decode_responses``: bytes keys and values."""
    return {k.decode(): v.decode() for k, v in raw.items()}


def _bound(b: float) -> str:
    return str(float(b))


def metrics_registry(store: JobStore, models: list[str]) -> CollectorRegistry:
    """A registry of its own per app, so tests can build several apps in one process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LensCollector(store, models))
    return registry
