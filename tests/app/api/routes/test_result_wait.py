"""``GET /v1/jobs/{id}/result?wait=S``: the result in one request, as soon as the job ends.

The API runs in-process against a real Redis; the job's end comes from another thread
through the job store, as a worker's would (its status event included)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import redis.asyncio
from fastapi.testclient import TestClient
from starlette.requests import Request

from app import presence
from app.api.routes import jobs
from app.blobstore import BlobStore
from app.core.redis_server import RedisServer
from app.events import EventHub
from app.jobstore import ANONYMOUS, JobStore
from app.schemas import JobError, JobStatus
from tests.conftest import api_client
from tests.waiting import await_until, wait_until

CONTENT = os.urandom(3000)


@pytest.fixture
def running(redis_conn: redis.Redis, tmp_path: Path) -> tuple[JobStore, BlobStore, str]:
    presence.heartbeat(redis_conn, "w", {}, ttl_s=60)  # alive: the API reaps no orphan
    store = JobStore(redis_conn, worker="w")
    job_id = store.create(kind="score", model="m", owner=ANONYMOUS, params={}).id
    assert store.start(job_id, "w") is not None
    return store, BlobStore(tmp_path / "results"), job_id


@contextmanager
def _api(redis_server: RedisServer, tmp_path: Path, blobs: BlobStore) -> Iterator[TestClient]:
    with api_client(redis_server, tmp_path, keys=[], results_dir=blobs.root) as client:
        yield client


@contextmanager
def _once_waiting(client: TestClient, job_id: str, action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` in another thread as soon as a request waits on ``job_id``'s events."""

    def act() -> None:
        wait_until(lambda: job_id in client.app.state.events._inboxes, 10, "a request waits")
        action()

    thread = threading.Thread(target=act)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def test_the_result_comes_as_soon_as_the_job_succeeds(
    redis_server: RedisServer, tmp_path: Path, running: tuple[JobStore, BlobStore, str]
) -> None:
    store, blobs, job_id = running

    def succeed() -> None:
        blobs.path(job_id).parent.mkdir(parents=True, exist_ok=True)
        blobs.path(job_id).write_bytes(CONTENT)
        assert store.finish(job_id, JobStatus.SUCCEEDED, ttl_s=100)

    with _api(redis_server, tmp_path, blobs) as client:
        assert client.get(f"/v1/jobs/{job_id}/result").status_code == 409  # no wait: at once
        with ThreadPoolExecutor(1) as pool, _once_waiting(client, job_id, succeed):
            asked = pool.submit(client.get, f"/v1/jobs/{job_id}/result", params={"wait": 60})
            wait_until(asked.done, 10, "the result came when the job ended, not at the wait's end")
    r = asked.result()
    assert r.status_code == 200 and r.content == CONTENT


def test_a_job_that_fails_meanwhile_is_409_with_its_error(
    redis_server: RedisServer, tmp_path: Path, running: tuple[JobStore, BlobStore, str]
) -> None:
    store, blobs, job_id = running
    error = JobError(type="InvalidParameter", message="texts: the text is empty")

    def fail() -> None:
        assert store.finish(job_id, JobStatus.FAILED, error=error, ttl_s=100)

    with _api(redis_server, tmp_path, blobs) as client, _once_waiting(client, job_id, fail):
        r = client.get(f"/v1/jobs/{job_id}/result", params={"wait": 30})
    assert r.status_code == 409
    assert r.json()["detail"] == (
        f"job {job_id} is failed, not succeeded: InvalidParameter: texts: the text is empty"
    )


def test_a_wait_that_runs_out_is_409_saying_so(
    redis_server: RedisServer, tmp_path: Path, running: tuple[JobStore, BlobStore, str]
) -> None:
    _, blobs, job_id = running
    with _api(redis_server, tmp_path, blobs) as client:
        began = time.monotonic()
        r = client.get(f"/v1/jobs/{job_id}/result", params={"wait": 0.3})
        waited = time.monotonic() - began
        head = client.head(f"/v1/jobs/{job_id}/result", params={"wait": 0.1})
    assert r.status_code == 409 and waited >= 0.3
    assert r.json()["detail"] == f"job {job_id} is running, not succeeded after waiting 0.3 s"
    assert head.status_code == 409


@pytest.mark.parametrize("wait", ["-1", "3601", "soon"])
def test_a_bad_wait_is_422_naming_it(
    redis_server: RedisServer,
    tmp_path: Path,
    running: tuple[JobStore, BlobStore, str],
    wait: str,
) -> None:
    _, blobs, job_id = running
    with _api(redis_server, tmp_path, blobs) as client:
        r = client.get(f"/v1/jobs/{job_id}/result", params={"wait": wait})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", "wait"]


def test_a_wait_ends_when_its_client_goes_away(
    redis_server: RedisServer, running: tuple[JobStore, BlobStore, str]
) -> None:
    """A client that disconnects while waiting frees its subscription at once, not at
    the end of its wait."""
    _, _, job_id = running

    async def main() -> None:
        hub = EventHub(redis_server.url)
        hub.start()
        aconn = redis.asyncio.Redis.from_url(redis_server.url)
        messages: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        messages.put_nowait({"type": "http.request", "body": b"", "more_body": False})
        request = Request({"type": "http", "method": "GET", "headers": []}, messages.get)
        try:
            waiting = asyncio.create_task(jobs._ended(job_id, aconn, hub, request, 600))
            await await_until(lambda: job_id in hub._inboxes, 10, "the wait subscribed")
            assert not waiting.done()
            messages.put_nowait({"type": "http.disconnect"})
            assert await asyncio.wait_for(waiting, 5) is None
            assert job_id not in hub._inboxes
        finally:
            await hub.stop()
            await aconn.aclose()

    asyncio.run(main())
