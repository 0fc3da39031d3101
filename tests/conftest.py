"""Fixtures shared by the suites: a real Redis, the demo model, and the whole service running.

Nothing here is mocked: Redis is a real redis-server child process, the API is
uvicorn on a free port, and workers are real ``lens worker`` processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from app.core.config import Limits, ModelSpec, Settings
from app.core.redis_server import RedisServer, free_port, start_redis
from app.main import create_app
from app.stack import Stack

DEMO = "demo"
LOCAL = "http://localhost"
"""Where in-process test clients say they send requests: without keys, the API answers
only requests addressed to this machine."""
JSONL = {"Content-Type": "application/x-ndjson"}
"""A data set upload's type: without keys, a body must declare one the API accepts."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run only where CUDA is: elsewhere they are skipped, saying so.
    torch is imported only when such a test was collected."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    for item in gpu:
        item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"), persist=False)
    yield server
    server.stop()


@pytest.fixture
def redis_conn(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A connection to an emptied database: each test starts clean."""
    conn = redis.Redis.from_url(redis_server.url)
    conn.flushdb()
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo model (a small Llama trained on a copy task), built once and cached."""
    from workers.lens.demo import ensure_demo_model

    return ensure_demo_model()


def service_settings(data_dir: Path, models: dict[str, Path], **overrides: object) -> Settings:
    return Settings(
        redis_url="redis://unused",
        data_dir=data_dir,
        models={name: ModelSpec(source=str(path)) for name, path in models.items()},
        port=free_port(),
        heartbeat_s=0.5,
        limits=Limits(max_texts=64, max_active_jobs_per_key=100),
        **overrides,
    )


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[Stack]:
    """Redis + API + one worker serving the demo model as ``demo``; shared by a session.
    Its results go to a directory of their own, and its worker runs one torch thread."""
    data_dir = tmp_path_factory.mktemp("service")
    settings = service_settings(
        data_dir, {DEMO: demo_model_dir}, results_dir=data_dir / "results", worker_threads=1
    )
    with running_stack(settings) as stack:
        yield stack


@contextmanager
def running_stack(
    settings: Settings, serves: list[str] | None = None, timeout: float = 180
) -> Iterator[Stack]:
    """A stack with one worker (serving ``serves``, default all), ready to take jobs."""
    stack = Stack(settings)
    try:
        stack.start(workers=1, serves=serves)
        stack.wait_ready(timeout=timeout, models=serves)
        yield stack
    finally:
        stack.stop()


@contextmanager
def api_client(
    redis_server: RedisServer,
    data_dir: Path,
    keys: list[str],
    headers: dict[str, str] | None = None,
    **overrides: object,
) -> Iterator[TestClient]:
    """The API in-process (no worker) with API ``keys``, serving a model ``m`` that no
    worker loads: for what the API decides on its own (auth, limits)."""
    settings = Settings(
        redis_url=redis_server.url,
        data_dir=data_dir,
        models={"m": ModelSpec(source="/nowhere")},
        api_keys=keys,
        **overrides,
    )
    with TestClient(create_app(settings), base_url=LOCAL, headers=headers) as client:
        yield client


@pytest.fixture
def http(service: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=60) as client:
        yield client
