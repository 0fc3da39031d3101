"""``lens api --api-keys FILE`` as a real process: keys enforced over HTTP, never logged."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from app.core.redis_server import RedisServer, free_port
from tests.waiting import wait_until

ALICE, BOB = "alice-9f8e7d6c5b4a39281706", "bob-1a2b3c4d5e6f70819203"


def lens(*args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}
    out = open(log, "wb") if log else subprocess.PIPE  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli.main", *args], env=env, stdout=out, stderr=subprocess.STDOUT
    )


def _answers(proc: subprocess.Popen[bytes], url: str, log: Path) -> bool:
    assert proc.poll() is None, log.read_text()
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def api(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path
) -> Iterator[tuple[str, Path]]:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{ALICE}\n{BOB}\n")
    port, log = free_port(), tmp_path / "api.log"
    proc = lens(
        "api", "--api-keys", str(keys), "--redis-url", redis_server.url,
        "--data-dir", str(tmp_path), "--model", "demo=/nowhere", "--port", str(port), log=log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(proc, url, log), 60, "the API started")
        yield url, log
    finally:
        proc.terminate()
        proc.wait(30)


def test_keys_from_a_file_guard_every_job_and_never_reach_the_log(
    api: tuple[str, Path],
) -> None:
    url, log = api
    with httpx.Client(base_url=url, timeout=30) as http:
        alice, bob = (
            {"Authorization": f"Bearer {ALICE}"},
            {"Authorization": f"Bearer {BOB}"},
        )
        assert http.get("/v1/models").status_code == 401
        assert (
            http.get("/v1/models", headers={"Authorization": "Bearer " + BOB[::-1]}).status_code
            == 401
        )
        assert http.get("/v1/models", headers=alice).status_code == 200
        r = http.post(
            "/v1/jobs", headers=alice, json={"kind": "score", "model": "demo", "texts": [BOB]}
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert http.get(f"/v1/jobs/{job_id}", headers=bob).status_code == 404
        assert http.get(f"/v1/jobs/{job_id}/events", headers=bob).status_code == 404
        assert http.delete(f"/v1/jobs/{job_id}", headers=bob).status_code == 404
        assert http.get(f"/v1/jobs/{job_id}", headers=alice).json()["status"] == "queued"
    text = wait_until(
        lambda: (t := log.read_text()).count(f"/v1/jobs/{job_id}") == 4 and t,
        10,
        "the API logged the job's four requests",
    )
    assert ALICE not in text and BOB not in text and BOB[::-1] not in text
    lines = [line for line in text.splitlines() if f"/v1/jobs/{job_id}" in line]
    assert len(lines) == 4 and all(f"job={job_id}" in line for line in lines)
    assert any(
        "POST /v1/jobs 202" in line and f"job={job_id}" in line for line in text.splitlines()
    )
    assert any("GET /v1/models 401" in line for line in text.splitlines())


def test_without_keys_the_api_refuses_to_listen_beyond_localhost(tmp_path: Path) -> None:
    proc = lens("api", "--host", "0.0.0.0", "--model", "demo=/nowhere", "--data-dir", str(tmp_path))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert b"localhost only" in out and b"--allow-unauthenticated" in out
