"""Expiry: job records, result blobs and data sets go together, and disk use follows the
records (real Redis; the API's own housekeeping loop does the sweeping)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import redis
from fastapi.testclient import TestClient

from app.blobstore import BlobStore
from app.core.config import ModelSpec, Settings
from app.core.redis_server import RedisServer
from app.jobstore import ANONYMOUS, JobStore
from app.keys import owner_index
from app.main import create_app
from app.maintenance import sweep
from app.schemas import JobStatus
from tests.conftest import JSONL, LOCAL
from tests.waiting import wait_until


def finished(store: JobStore, blobs: BlobStore, ttl_s: int) -> str:
    """A succeeded job with its blob on disk, expiring after ``ttl_s``."""
    job_id = store.create(kind="score", model="m", owner=ANONYMOUS, params={}).id
    store.start(job_id, "w")
    blobs.path(job_id).parent.mkdir(parents=True, exist_ok=True)
    blobs.path(job_id).write_bytes(b"result")
    assert store.finish(job_id, JobStatus.SUCCEEDED, ttl_s=ttl_s)
    return job_id


def test_sweep_deletes_what_outlived_its_record(redis_conn: redis.Redis, tmp_path: Path) -> None:
    store, blobs = JobStore(redis_conn), BlobStore(tmp_path / "blobs")
    kept, expired = finished(store, blobs, ttl_s=100), finished(store, blobs, ttl_s=100)
    redis_conn.delete(f"lens:job:{expired}")
    stale_temp = blobs.path(kept).parent / f".{kept}.abc.tmp"
    fresh_temp = blobs.path(kept).parent / f".{kept}.def.tmp"
    stale_temp.write_bytes(b"partial")
    fresh_temp.write_bytes(b"partial")
    os.utime(stale_temp, (time.time() - 7200, time.time() - 7200))
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    (datasets / ("a" * 32 + ".json")).write_text("[]")
    (datasets / ("b" * 32 + ".json")).write_text("[]")
    redis_conn.hset("lens:dataset:" + "a" * 32, "owner", ANONYMOUS)
    stale_upload = datasets / f".{'c' * 32}.tmp"  # an upload whose API process died
    stale_upload.write_text("[")
    os.utime(stale_upload, (time.time() - 7200, time.time() - 7200))
    retried = blobs.path(kept, 1)  # a second attempt's result, its record still there
    retried.write_bytes(b"result")
    redis_conn.zadd(owner_index(ANONYMOUS), {expired: 0.0}, xx=True)

    report = sweep(store, blobs, datasets, keep_index_s=60)
    assert (report.blobs, report.temps, report.datasets, report.index_entries) == (1, 2, 1, 1)
    assert blobs.exists(kept) and not blobs.exists(expired) and retried.exists()
    assert fresh_temp.exists() and not stale_temp.exists()
    assert sorted(p.stem[0] for p in datasets.iterdir()) == ["a"]
    assert redis_conn.zrange(owner_index(ANONYMOUS), 0, -1) == [kept.encode()]


def test_results_and_data_sets_expire_after_the_operator_ttl(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    settings = Settings(
        redis_url=redis_server.url,
        data_dir=tmp_path,
        models={"m": ModelSpec(source="/nowhere")},
        result_ttl_s=1,
        heartbeat_s=0.1,
        sweep_interval_s=0.1,
    )
    store, blobs = JobStore(redis_conn), BlobStore(settings.blob_dir)
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        row = json.dumps({"prompt": "a b", "target": " c"})
        dataset = client.post("/v1/datasets", content=row, headers=JSONL).json()["id"]
        job_id = finished(store, blobs, ttl_s=settings.result_ttl_s)
        assert client.get(f"/v1/jobs/{job_id}/result").status_code == 200
        assert (settings.dataset_dir / f"{dataset}.json").exists()
        wait_until(
            lambda: (
                not blobs.exists(job_id) and not (settings.dataset_dir / f"{dataset}.json").exists()
            ),
            10,
            "the sweeper deleted the expired files",
        )
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
        r = client.post(
            "/v1/jobs", json={"kind": "chg", "model": "m", "dataset": dataset, "num_updates": 1}
        )
        assert r.status_code == 404 and "data set" in r.json()["detail"]
    assert list(settings.blob_dir.rglob("*.safetensors")) == []
