"""Failures survived, on one real stack (Redis, one worker serving ``demo``, the API; the
model ``idle`` has no worker): queue visibility, cancellation of running fits, out of
memory, a Redis outage, and a worker killed mid-fit. The kill comes last: it leaves the
stack without a worker."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from app import presence
from app.core.redis_server import start_redis
from app.stack import Stack
from tests.conftest import DEMO, running_stack, service_settings
from tests.waiting import ended, poll_job, wait_until

HEARTBEAT_S = 1.0
BOUND_S = 4 * HEARTBEAT_S
"""Worker death to failed job: 3 beats for its key to expire, then one reaping pass."""
SLACK_S = 3.0
"""Scheduling noise on a busy 2-core machine, on top of the bound."""
BEAT_FAILED = "heartbeat failed, Redis unavailable"
PAIRS = {"texts": ["red cat blue dog | red cat blue", "one two | one"], "targets": [" dog", " two"]}
LONG_CHG = {"kind": "chg", **PAIRS, "num_masks": 2, "batch_size": 2, "num_updates": 5000}
LONG_CCHG = {
    "kind": "cchg",
    "retain_texts": PAIRS["texts"][:1],
    "retain_targets": PAIRS["targets"][:1],
    "forget_texts": PAIRS["texts"][1:],
    "forget_targets": PAIRS["targets"][1:],
    "batch_size": 1,
    "num_updates": 5000,
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[Stack]:
    settings = service_settings(
        tmp_path_factory.mktemp("failures"), {DEMO: demo_model_dir, "idle": demo_model_dir}
    ).model_copy(update={"heartbeat_s": HEARTBEAT_S, "worker_memory_mb": 300})
    with running_stack(settings, serves=[DEMO]) as stack:
        yield stack


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


def submit(http: httpx.Client, model: str = DEMO, **body: Any) -> dict[str, Any]:
    r = http.post("/v1/jobs", json={"model": model, **body})
    assert r.status_code == 202, r.text
    return r.json()


def log_of(stack: Stack, worker: str) -> str:
    return (stack.settings.data_dir / "logs" / f"{worker}.log").read_text()


def fitting(doc: dict[str, Any]) -> bool:
    return doc["status"] == "running" and (doc["progress"] or {}).get("step", 0) >= 2


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name}{labels}")


def test_queue_visibility_with_a_model_no_worker_serves(http: httpx.Client) -> None:
    running = submit(http, **LONG_CHG)["id"]
    poll_job(http, running, fitting)
    waiting = [submit(http, "idle", kind="score", texts="one")["id"] for _ in range(2)]
    assert [http.get(f"/v1/jobs/{i}").json()["queue_position"] for i in waiting] == [0, 1]
    models = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
    assert models[DEMO]["running"] == 1 and models[DEMO]["worker_alive"]
    assert models[DEMO]["resident"] == ["worker-0"] and models[DEMO]["queue_depth"] == 0
    idle = models["idle"]
    assert (idle["queue_depth"], idle["running"], idle["worker_alive"]) == (2, 0, False)
    assert idle["resident"] == [] and idle["layers"] is None
    assert metric(http, "lens_queue_depth", model="idle") == 2
    assert metric(http, "lens_jobs_running", model=DEMO) == 1
    assert metric(http, "lens_workers") == 1
    for job_id in (running, *waiting):
        assert http.delete(f"/v1/jobs/{job_id}").status_code == 202
    assert poll_job(http, running, ended)["status"] == "cancelled"
    assert http.get("/v1/models/idle").json()["queue_depth"] == 0


@pytest.mark.parametrize("body", [LONG_CHG, LONG_CCHG], ids=["chg", "cchg"])
def test_cancel_stops_a_running_fit_within_one_step(
    http: httpx.Client, body: dict[str, Any]
) -> None:
    job_id = submit(http, **body)["id"]
    poll_job(http, job_id, fitting)
    assert http.delete(f"/v1/jobs/{job_id}").status_code == 202
    step_after_cancel = http.get(f"/v1/jobs/{job_id}").json()["progress"]["step"]
    doc = poll_job(http, job_id, ended)
    assert doc["status"] == "cancelled", doc
    # the worker checks for a cancel before publishing each step: nothing after it
    assert doc["progress"]["step"] <= step_after_cancel
    assert http.get(f"/v1/jobs/{job_id}/result").status_code == 409


def test_out_of_memory_fails_the_job_and_the_worker_goes_on(
    http: httpx.Client, stack: Stack
) -> None:
    pid = stack.workers["worker-0"].pid
    texts = ["red cat blue dog green owl pig | red cat blue dog green owl"] * 64
    big = submit(
        http, kind="chg", texts=texts, targets=[" pig"] * 64, num_masks=64, batch_size=64,
        num_updates=2, num_reg_updates=0,
    )  # fmt: skip
    after = submit(http, kind="score", texts="red cat | red")
    doc = poll_job(http, big["id"], ended)
    assert doc["status"] == "failed" and doc["error"]["type"] == "OutOfMemory", doc
    message = doc["error"]["message"]
    assert message.startswith("out of memory running chg: 64 texts")
    assert "num_masks × batch_size = 4096" in message
    assert poll_job(http, after["id"], ended)["status"] == "succeeded"
    assert stack.workers["worker-0"].poll() is None and stack.workers["worker-0"].pid == pid


def test_redis_outage_is_503_then_both_sides_recover(http: httpx.Client, stack: Stack) -> None:
    assert stack.redis is not None
    port, files, password = stack.redis.port, stack.redis.data_dir, stack.redis.password
    before = submit(http, kind="score", texts="one two")["id"]
    poll_job(http, before, ended)
    failed_beats = log_of(stack, "worker-0").count(BEAT_FAILED)
    stack.redis.stop()
    try:
        for method, path in (
            ("GET", "/v1/jobs"),
            ("GET", f"/v1/jobs/{before}"),
            ("GET", "/healthz"),
        ):
            r = http.request(method, path)
            assert r.status_code == 503, r.text
            assert "Redis" in r.json()["detail"] and r.headers["retry-after"]
        r = http.post("/v1/jobs", json={"model": DEMO, "kind": "score", "texts": "one"})
        assert r.status_code == 503
        assert metric(http, "lens_redis_up") == 0
        wait_until(
            lambda: log_of(stack, "worker-0").count(BEAT_FAILED) > failed_beats,
            30,
            "the worker noticed the outage",
        )
    finally:
        stack.redis = start_redis(files, port, password=password)
    wait_until(lambda: http.get("/healthz").status_code == 200, 30, "the API reconnected")
    assert http.get(f"/v1/jobs/{before}").json()["status"] == "succeeded"
    after = submit(http, kind="score", texts="one two")
    assert poll_job(http, after["id"], ended, timeout=30)["status"] == "succeeded"


def test_a_worker_killed_mid_fit_fails_its_job_within_the_bound(
    http: httpx.Client, stack: Stack
) -> None:
    job_id = submit(http, **LONG_CHG)["id"]
    poll_job(http, job_id, fitting)
    worker = stack.workers["worker-0"]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    doc = poll_job(http, job_id, ended, timeout=BOUND_S + SLACK_S)
    assert doc["status"] == "failed", doc
    assert doc["error"]["type"] == "WorkerLost" and "worker-0" in doc["error"]["message"]
    assert not http.get(f"/v1/models/{DEMO}").json()["worker_alive"]
    conn = redis.Redis.from_url(stack.settings.redis_url)
    assert presence.live_workers(conn) == {} and conn.hlen("lens:running") == 0
