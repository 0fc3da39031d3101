"""Retry-once on worker loss, live (``retry_lost_jobs``): a worker SIGKILLed mid-fit, its
job queued again and finished by another worker; a job that loses a second worker fails."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.stack import Stack
from tests.conftest import DEMO, running_stack, service_settings
from tests.integration.test_failures import fitting, log_of, submit
from tests.waiting import ended, poll_job

PAIRS = {"texts": ["red cat blue dog | red cat blue", "one two | one"], "targets": [" dog", " two"]}
FIT = {"kind": "chg", **PAIRS, "num_masks": 2, "batch_size": 2, "seed": 3}
HEARTBEAT_S = 1.0
"""A live worker's key outlives a beat held up 2 s by a busy machine: only the killed
one is presumed lost."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[Stack]:
    settings = service_settings(
        tmp_path_factory.mktemp("retry"),
        {DEMO: demo_model_dir},
        retry_lost_jobs=True,
    ).model_copy(update={"heartbeat_s": HEARTBEAT_S})
    with running_stack(settings) as stack:
        yield stack


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


def _kill_the_worker_running(http: httpx.Client, stack: Stack, job_id: str) -> str:
    """SIGKILL the one live worker once the job is fitting there; start a fresh one."""
    poll_job(http, job_id, fitting)
    (name,) = [n for n, p in stack.workers.items() if p.poll() is None]
    os.kill(stack.workers[name].pid, signal.SIGKILL)
    stack.workers[name].wait()
    successor = f"after-{name}"
    stack.spawn_worker(successor)
    return successor


def test_a_job_that_loses_its_worker_runs_again_elsewhere(http: httpx.Client, stack: Stack) -> None:
    job_id = submit(http, **FIT, num_updates=150, num_reg_updates=50)["id"]
    successor = _kill_the_worker_running(http, stack, job_id)
    requeued = poll_job(http, job_id, lambda d: d["retries"] == 1, timeout=30)
    assert requeued["status"] in ("queued", "running"), requeued
    doc = poll_job(http, job_id, ended, timeout=120)
    assert doc["status"] == "succeeded", doc
    assert doc["retries"] == 1 and doc["summary"]["num_masks"] == 2
    assert http.get(f"/v1/jobs/{job_id}/result").status_code == 200
    assert job_id in log_of(stack, successor), "the new worker ran it"


def test_a_job_that_loses_a_second_worker_fails(http: httpx.Client, stack: Stack) -> None:
    job_id = submit(http, **FIT, num_updates=5000)["id"]
    _kill_the_worker_running(http, stack, job_id)
    poll_job(http, job_id, lambda d: d["retries"] == 1 and fitting(d), timeout=60)
    _kill_the_worker_running(http, stack, job_id)
    doc: dict[str, Any] = poll_job(http, job_id, ended, timeout=60)
    assert doc["status"] == "failed", doc
    assert doc["error"]["type"] == "WorkerLost" and doc["retries"] == 1
