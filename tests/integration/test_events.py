"""Event streams: one Redis subscription per API process, whatever the number of waiters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from pathlib import Path

import httpx
import pytest
import redis

from app.core.config import Limits, ModelSpec, Settings
from app.core.redis_server import RedisServer, free_port, start_redis
from app.events import LOST, READY_TIMEOUT_S, EventHub
from app.keys import events_channel
from app.stack import Stack
from tests.waiting import wait_until

WAITERS = 60
"""More than the API's thread pool (40): each stream once held one of its threads."""
ANSWER_S = 5.0
"""Half a stream's keep-alive: an API waiting for one to free a thread answers later."""


def test_many_waiting_clients_leave_the_api_responsive(tmp_path: Path) -> None:
    settings = Settings(
        redis_url="redis://unused",
        data_dir=tmp_path,
        models={"m": ModelSpec(source="/nowhere")},  # no worker: the jobs stay queued
        port=free_port(),
        limits=Limits(max_active_jobs_per_key=WAITERS + 1, max_streams_per_key=WAITERS),
    )
    stack = Stack(settings)
    try:
        stack.start(workers=0)
        stack.wait_api()
        http = httpx.Client(base_url=stack.url, timeout=30)
        body = {"kind": "score", "model": "m", "texts": "a b"}
        ids = [http.post("/v1/jobs", json=body).json()["id"] for _ in range(WAITERS)]
        first_events: list[dict[str, object]] = []

        def follow(job_id: str) -> None:
            """Record the first event, then stay connected (until the stack stops)."""
            url = f"{stack.url}/v1/jobs/{job_id}/events"
            with contextlib.suppress(httpx.HTTPError), httpx.stream("GET", url, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and len(first_events) < WAITERS:
                        first_events.append(json.loads(line.removeprefix("data: ")))

        for job_id in ids:
            threading.Thread(target=follow, args=(job_id,), daemon=True).start()
        wait_until(lambda: len(first_events) >= WAITERS, 10, "every stream's first event")
        assert len(first_events) == WAITERS and {e["status"] for e in first_events} == {"queued"}
        # every stream, its first event sent, waits for its job's next one; the API still
        # answers well within a stream's 10 s keep-alive (it used to wait for one to free a
        # thread): each request's deadline is half of it
        for request in (
            lambda: http.get("/healthz", timeout=ANSWER_S),
            lambda: http.post("/v1/jobs", json=body, timeout=ANSWER_S),
            lambda: http.get(f"/v1/jobs/{ids[0]}", timeout=ANSWER_S),
        ):
            assert request().status_code in (200, 202)
    finally:
        stack.stop()


def test_the_hub_routes_each_jobs_events_and_reports_a_lost_subscription(
    tmp_path: Path,
) -> None:
    server = start_redis(tmp_path / "redis", persist=False)
    asyncio.run(_hub_scenario(server))


async def _hub_scenario(server: RedisServer) -> None:
    hub = EventHub(server.url)
    hub.start()
    conn = redis.Redis.from_url(server.url)
    try:
        async with hub.subscription("a") as inbox_a, hub.subscription("b") as inbox_b:
            conn.publish(events_channel("a"), b'{"event": "progress", "step": 1}')
            conn.publish(events_channel("b"), b'{"event": "status", "status": "running"}')
            assert await asyncio.wait_for(inbox_a.get(), 5) == b'{"event": "progress", "step": 1}'
            assert json.loads(await asyncio.wait_for(inbox_b.get(), 5))["status"] == "running"
            assert inbox_a.empty() and inbox_b.empty()
            server.stop()
            assert await asyncio.wait_for(inbox_a.get(), 10) == LOST
            assert await asyncio.wait_for(inbox_b.get(), 10) == LOST

        async def subscribe() -> None:
            async with hub.subscription("c"):
                pass

        with pytest.raises(redis.ConnectionError):
            await asyncio.wait_for(subscribe(), READY_TIMEOUT_S + 1)
    finally:
        conn.close()
        await hub.stop()
