"""``lens serve`` as a real process: with no model it can load, it stops with the reason in
one line (exit status 1, no traceback); a worker that dies later is started again."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from app import presence
from app.core.redis_server import PASSWORD_FILE, RedisServer, free_port
from app.stack import MAX_QUICK_EXITS, ChildExited, Stack
from tests.conftest import DEMO, service_settings
from tests.waiting import poll_job, wait_until


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}


def test_a_model_that_cannot_load_stops_serve_with_the_workers_reason(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    done = subprocess.run(
        [
            sys.executable, "-m", "app.cli.main", "serve", "--model", f"demo={missing}",
            "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
        ],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    (error,) = done.stderr.strip().splitlines()
    reason = f"cannot load it from {missing}: FileNotFoundError: no such directory"
    assert error.startswith(f"error: model demo cannot be served: {reason}")
    assert error.endswith(f"(no model left to serve; the logs: {tmp_path / 'data' / 'logs'})")


def test_a_worker_or_redis_that_dies_is_started_again_and_jobs_go_on(
    tmp_path: Path, demo_model_dir: Path
) -> None:
    """Its worker killed, then its Redis: each is started again (Redis on the same port,
    with the same password and append-only file) and jobs go on. The Redis password is
    never printed; SIGTERM stops everything cleanly."""
    port, out, err = free_port(), tmp_path / "out.txt", tmp_path / "err.txt"
    data = tmp_path / "data"
    with out.open("w") as stdout, err.open("w") as stderr:
        serve = subprocess.Popen(
            [
                sys.executable, "-m", "app.cli.main", "serve",
                "--model", f"{DEMO}={demo_model_dir}", "--port", str(port),
                "--data-dir", str(data),
            ],
            env=_env(), stdout=stdout, stderr=stderr,
        )  # fmt: skip
    try:
        wait_until(lambda: "lens-server ready" in out.read_text(), 120, "ready line")
        shown = re.search(r"redis (redis://:\*\*\*@127\.0\.0\.1:(\d+)/0)", out.read_text())
        assert shown, out.read_text()
        password = (data / "redis" / PASSWORD_FILE).read_text().strip()
        conn = redis.Redis(host="127.0.0.1", port=int(shown.group(2)), password=password)
        (first,) = presence.live_workers(conn).values()
        os.kill(first["pid"], signal.SIGKILL)

        def restarted() -> bool:
            pids = {w["pid"] for w in presence.live_workers(conn).values()}
            return bool(pids - {first["pid"]})

        wait_until(restarted, 120, "new worker")
        assert "worker-0 exited with code -9" in err.read_text()
        assert "starting worker-0 again" in err.read_text()
        (redis_pid,) = [p for p in _children(serve.pid) if "redis-server" in _cmdline(p)]
        os.kill(redis_pid, signal.SIGKILL)
        wait_until(lambda: "starting redis again" in err.read_text(), 30, "restart of redis")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            job = http.post("/v1/jobs", json={"kind": "score", "model": DEMO, "texts": ["a b"]})
            assert job.status_code == 202, job.text
            doc = poll_job(http, job.json()["id"], timeout=120)
            assert doc["status"] == "succeeded", doc
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=120) == 0, err.read_text()
    printed = out.read_text() + err.read_text()
    assert password not in printed
    assert password not in "".join(p.read_text() for p in (data / "logs").glob("*.log"))


def test_a_child_that_keeps_exiting_is_not_started_again_for_ever(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    settings = service_settings(tmp_path, {DEMO: tmp_path / "missing"})
    stack = Stack(settings.model_copy(update={"redis_url": redis_server.url}))
    reports: list[str] = []
    with socket.create_server(("127.0.0.1", settings.port)):  # the API's port, taken
        stack.start_api()
        try:
            with pytest.raises(ChildExited, match="it keeps exiting"):
                stack.supervise(reports.append, poll_s=0.1)
        finally:
            stack.stop()
    assert len(reports) == MAX_QUICK_EXITS - 1
    taken = f"cannot listen on 127.0.0.1:{settings.port}: Address already in use"
    assert all(taken in r and "starting api again" in r for r in reports), reports


def test_a_port_another_server_holds_stops_serve_with_one_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable, "-m", "app.cli.main", "serve", "--model", f"demo={tmp_path}",
                "--port", str(port), "--data-dir", str(tmp_path / "data"),
            ],
            env=_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert not (tmp_path / "data").exists()  # nothing was started


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_nothing_outlives_a_killed_serve(tmp_path: Path, demo_model_dir: Path) -> None:
    """``lens serve`` SIGKILLed (no chance to stop anything): every child ends, Redis
    included, whatever it was doing (here: its workers still starting)."""
    out = tmp_path / "out.txt"
    with out.open("w") as stdout:
        serve = subprocess.Popen(
            [
                sys.executable, "-m", "app.cli.main", "serve",
                "--model", f"{DEMO}={demo_model_dir}", "--workers", "2",
                "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
            ],
            env=_env(), stdout=stdout, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        wait_until(lambda: "starting: redis" in out.read_text(), 60, "children started")
        children = _children(serve.pid)
        assert len(children) == 4 and any("redis-server" in _cmdline(p) for p in children)
        serve.kill()
        serve.wait(10)
        wait_until(lambda: not [p for p in children if _alive(p)], 60, "end of every child")
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
