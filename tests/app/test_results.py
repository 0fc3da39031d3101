"""Result downloads: small files in one read, large ones streamed, the same bytes either way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from app.api.routes.jobs import SMALL_RESULT_BYTES
from app.blobstore import BlobStore
from app.core.redis_server import RedisServer
from app.jobstore import ANONYMOUS, JobStore
from app.schemas import JobStatus
from tests.conftest import api_client


@pytest.mark.parametrize("size", [10, SMALL_RESULT_BYTES, SMALL_RESULT_BYTES + 1, 5 << 20])
def test_results_of_every_size_come_back_whole(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path, size: int
) -> None:
    store = JobStore(redis_conn)
    blobs = BlobStore(tmp_path / "results")
    job_id = store.create(kind="score", model="m", owner=ANONYMOUS, params={}).id
    store.start(job_id, "w")
    content = os.urandom(size)
    blobs.path(job_id).parent.mkdir(parents=True, exist_ok=True)
    blobs.path(job_id).write_bytes(content)
    assert store.finish(job_id, JobStatus.SUCCEEDED, ttl_s=100)
    with api_client(redis_server, tmp_path, keys=[], results_dir=blobs.root) as client:
        r = client.get(f"/v1/jobs/{job_id}/result")
        assert r.status_code == 200 and r.content == content
        assert r.headers["content-length"] == str(size)
        assert r.headers["content-type"] == "application/octet-stream"
        disposition = r.headers["content-disposition"]
        assert disposition == f'attachment; filename="score-{job_id}.safetensors"'
        blobs.delete(job_id)
        assert client.get(f"/v1/jobs/{job_id}/result").status_code == 404
