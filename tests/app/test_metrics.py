"""The /metrics collector against a real Redis (workers simulated by their heartbeats), and
the structured log format."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app import presence, queue
from app.core.config import ModelSpec, Settings
from app.core.redis_server import RedisServer, free_port
from app.jobstore import DURATION_BUCKETS_S, JobStore
from app.logs import configure_logging, job_context
from app.main import create_app
from app.maintenance import reap_lost_jobs
from app.schemas import JobStatus
from tests.conftest import LOCAL


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def settings_for(url: str, tmp_path: Path) -> Settings:
    models = {"a": ModelSpec(source="x"), "b": ModelSpec(source="y")}
    return Settings(redis_url=url, data_dir=tmp_path, models=models)


def test_metrics_read_jobs_queues_and_workers_from_redis(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    store = JobStore(redis_conn)
    durations = []
    for status in (JobStatus.SUCCEEDED, JobStatus.SUCCEEDED, JobStatus.FAILED):
        job_id = store.create(kind="score", model="a", owner="o", params={}).id
        store.start(job_id, "w1")
        store.finish(job_id, status, ttl_s=60)
        durations.append(redis_conn.hget(f"lens:job:{job_id}", "finished_at"))
    running = store.create(kind="chg", model="a", owner="o", params={}).id
    store.start(running, "w1")
    for _ in range(3):
        queue.enqueue(
            redis_conn, "b", store.create(kind="trace", model="b", owner="o", params={}).id, 60
        )
    gpu = {"device": "cuda:0", "allocated": 1024, "reserved": 2048, "total": 8192}
    presence.heartbeat(
        redis_conn,
        "w1",
        {"models": ["a"], "resident": ["a"], "load_seconds": {"a": 1.5}, "gpus": [gpu]},
        ttl_s=10,
    )
    scans = _keyspace_scans(redis_conn)
    with TestClient(create_app(settings_for(redis_server.url, tmp_path)), base_url=LOCAL) as client:
        r = client.get("/metrics")
    reap_lost_jobs(store, Settings())
    assert _keyspace_scans(redis_conn) == scans, "neither the scrape nor the reaper scans"
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    got = samples(r.text)
    assert got[("lens_redis_up", ())] == 1
    assert got[("lens_jobs_submitted_total", (("kind", "score"),))] == 3
    assert got[("lens_jobs_submitted_total", (("kind", "trace"),))] == 3
    assert got[("lens_jobs_finished_total", (("kind", "score"), ("status", "succeeded")))] == 2
    assert got[("lens_jobs_finished_total", (("kind", "score"), ("status", "failed")))] == 1
    assert got[("lens_job_duration_seconds_count", (("kind", "score"),))] == 3
    assert got[("lens_job_duration_seconds_bucket", (("kind", "score"), ("le", "+Inf")))] == 3
    buckets = [
        got[("lens_job_duration_seconds_bucket", (("kind", "score"), ("le", str(float(b)))))]
        for b in DURATION_BUCKETS_S
    ]
    assert buckets == sorted(buckets) and buckets[0] == 3, "a few ms: in every bucket"
    assert 0 <= got[("lens_job_duration_seconds_sum", (("kind", "score"),))] < 3
    assert got[("lens_queue_depth", (("model", "b"),))] == 3
    assert got[("lens_queue_depth", (("model", "a"),))] == 0
    assert got[("lens_jobs_running", (("model", "a"),))] == 1
    assert got[("lens_workers", ())] == 1
    assert got[("lens_model_resident", (("model", "a"),))] == 1
    assert got[("lens_model_resident", (("model", "b"),))] == 0
    assert got[("lens_model_load_seconds", (("model", "a"), ("worker", "w1")))] == 1.5
    for name, value in (("allocated", 1024), ("reserved", 2048), ("total", 8192)):
        key = (f"lens_gpu_memory_{name}_bytes", (("device", "cuda:0"), ("worker", "w1")))
        assert got[key] == value


def _keyspace_scans(conn: redis.Redis) -> int:
    """Calls of SCAN and KEYS the server has answered so far."""
    stats = cast("dict[str, dict[str, int]]", conn.info("commandstats"))
    return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("scan", "keys"))


def test_metrics_say_when_redis_is_down(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with TestClient(create_app(settings_for(url, tmp_path)), base_url=LOCAL) as client:
        r = client.get("/metrics")
    assert r.status_code == 200
    assert samples(r.text) == {("lens_redis_up", ()): 0}


@pytest.fixture
def capture() -> Iterator[Callable[..., io.StringIO]]:
    """Configure logging as a process would, into a string; restore pytest's afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)

    def configure(component: str, **options: object) -> io.StringIO:
        stream = io.StringIO()
        configure_logging(component, **options)  # type: ignore[arg-type]
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        return stream

    yield configure
    root.handlers[:], root.level = saved


def test_key_value_lines_carry_the_job_and_mask_secrets(capture) -> None:
    stream = capture("worker", fmt="kv", secrets=["sekrit-key"])
    log = logging.getLogger("lens.test")
    log.info("outside")
    with job_context("f" * 32):
        log.warning("inside with %s and a = sign", "sekrit-key")
    first, second = stream.getvalue().splitlines()
    assert "level=info component=worker logger=lens.test job=- msg=outside" in first
    assert f"level=warning component=worker logger=lens.test job={'f' * 32}" in second
    assert 'msg="inside with *** and a = sign"' in second
    assert "sekrit" not in stream.getvalue()


def test_json_lines(capture) -> None:
    stream = capture("api", fmt="json")
    with job_context("a" * 32):
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("x").exception("failed")
    record = json.loads(stream.getvalue())
    assert record["job"] == "a" * 32 and record["component"] == "api"
    assert record["msg"] == "failed" and "ValueError: boom" in record["exc"]
