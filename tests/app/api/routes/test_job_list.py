"""``GET /v1/jobs``: the caller's jobs, newest first, with the queued ones' positions."""

from __future__ import annotations

from pathlib import Path

import redis
from fastapi.testclient import TestClient

from app.core.config import Limits
from app.core.redis_server import RedisServer
from tests.conftest import api_client


def _submit(client: TestClient, text: str) -> str:
    r = client.post("/v1/jobs", json={"kind": "score", "model": "m", "texts": [text]})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_listing_pages_through_records_and_positions_every_queued_job(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    limits = Limits(max_active_jobs_per_key=1000)
    with api_client(redis_server, tmp_path, [], limits=limits) as client:
        ids = [_submit(client, f"text {i}") for i in range(130)]  # more than a page of 100
        cancelled = ids[5]
        assert client.delete(f"/v1/jobs/{cancelled}").status_code == 202
        queued = [i for i in ids if i != cancelled]

        listed = client.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]
        assert [j["id"] for j in listed] == ids[::-1]
        position = {j["id"]: j["queue_position"] for j in listed}
        assert [position[i] for i in queued] == list(range(len(queued)))
        assert position[cancelled] is None

        only = client.get("/v1/jobs", params={"status": "queued", "limit": 120}).json()["jobs"]
        assert [j["id"] for j in only] == queued[::-1][:120]
        assert [j["queue_position"] for j in only] == list(range(len(queued)))[::-1][:120]
        cancelled_only = client.get("/v1/jobs", params={"status": "cancelled"}).json()["jobs"]
        assert [j["id"] for j in cancelled_only] == [cancelled]
