"""Stopping and restarting the whole stack (what Ctrl-C on ``lens serve`` does) loses no
queued job and no finished result: Redis persists to the data directory (append-only
file), and the workers finish or cleanly fail what they were running."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis

from app.stack import Stack
from tests.conftest import DEMO, service_settings
from tests.waiting import ended, poll_job

PAIRS = {"texts": ["red cat blue dog | red cat blue", "one two | one"], "targets": [" dog", " two"]}
GRACE_S = 6.0


def submit(http: httpx.Client, model: str = DEMO, **body: Any) -> str:
    r = http.post("/v1/jobs", json={"model": model, **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def fitting(doc: dict[str, Any]) -> bool:
    return doc["status"] == "running" and (doc["progress"] or {}).get("step", 0) >= 1


def last_line_time(log: Path, pattern: str) -> datetime:
    times = [
        datetime.fromisoformat(m.group(1))
        for line in log.read_text().splitlines()
        if pattern in line and (m := re.match(r"ts=(\S+)", line))
    ]
    assert times, f"no {pattern!r} in {log}"
    return times[-1]


def test_a_restart_of_the_whole_stack_loses_nothing(tmp_path: Path, demo_model_dir: Path) -> None:
    settings = service_settings(tmp_path, {DEMO: demo_model_dir, "later": demo_model_dir})
    settings = settings.model_copy(update={"shutdown_grace_s": GRACE_S, "worker_threads": 1})
    first = Stack(settings)
    try:
        first.start(workers=2, serves=[DEMO])
        first.wait_ready(timeout=180, models=[DEMO])
        with httpx.Client(base_url=first.url, timeout=30) as http:
            done = submit(http, kind="score", texts="red cat | red")
            assert poll_job(http, done, ended)["status"] == "succeeded"
            result = http.get(f"/v1/jobs/{done}/result").content
            queued = submit(http, "later", kind="score", texts="one two | one")
            long_fit = submit(
                http, kind="chg", **PAIRS, num_masks=1, batch_size=2, num_updates=5000
            )
            short_fit = submit(
                http, kind="chg", **PAIRS, num_masks=1, batch_size=2, num_updates=10,
                num_reg_updates=0,
            )  # fmt: skip
            poll_job(http, long_fit, fitting)
            poll_job(http, short_fit, lambda doc: fitting(doc) or ended(doc))
            listed = http.get("/v1/jobs").json()["jobs"]
    finally:
        workers = dict(first.workers)
        first.stop()
    assert all(w.returncode == 0 for w in workers.values()), "SIGTERM: a clean exit"
    logs = tmp_path / "logs"
    api_down = last_line_time(logs / "api.log", "Finished server process")
    assert all(last_line_time(logs / f"{n}.log", "stopped") > api_down for n in workers)

    second = Stack(service_settings(tmp_path, {DEMO: demo_model_dir, "later": demo_model_dir}))
    try:
        second.start(workers=1)
        second.wait_ready(timeout=180)
        conn = redis.Redis.from_url(second.settings.redis_url)
        assert conn.config_get("appendonly")["appendonly"] == "yes"
        assert Path(conn.config_get("dir")["dir"]) == (tmp_path / "redis").resolve()
        with httpx.Client(base_url=second.url, timeout=30) as http:
            assert http.get(f"/v1/jobs/{done}/result").content == result
            assert poll_job(http, queued, ended)["status"] == "succeeded"
            assert http.get(f"/v1/jobs/{short_fit}").json()["status"] == "succeeded"
            assert http.get(f"/v1/jobs/{short_fit}/result").status_code == 200
            stopped = http.get(f"/v1/jobs/{long_fit}").json()
            assert stopped["status"] == "failed", stopped
            assert stopped["error"]["type"] == "WorkerShutdown"
            ids = [j["id"] for j in http.get("/v1/jobs").json()["jobs"]]
            assert ids == [j["id"] for j in listed]
    finally:
        second.stop()
