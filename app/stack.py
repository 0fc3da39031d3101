"""Run the whole service on one machine: Redis, N workers and the API as child processes.

Used by ``lens serve``, ``lens demo`` and the integration tests. Children run in
their own sessions so that Ctrl-C reaches only the supervisor, which then stops
them in order: the API first (no new jobs), the workers (each finishes or
fails its job), Redis last (flushing its append-only file).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.core.config import Settings
from app.core.redis_server import RedisServer, start_redis

STOP_TIMEOUT_S = 30.0


def child_env(settings: Settings) -> dict[str, str]:
    """The environment that hands ``settings`` to a child process."""
    env = dict(os.environ)
    env.update(
        {
            "LENS_REDIS_URL": settings.redis_url,
            "LENS_DATA_DIR": str(settings.data_dir.resolve()),
            "LENS_MODELS": json.dumps(
                {k: v.model_dump(exclude_none=True) for k, v in settings.models.items()}
            ),
            "LENS_HOST": settings.host,
            "LENS_PORT": str(settings.port),
            "LENS_API_KEYS": ",".join(settings.key_values()),
            "LENS_HEARTBEAT_S": str(settings.heartbeat_s),
            "LENS_RESULT_TTL_S": str(settings.result_ttl_s),
            "LENS_JOB_TIMEOUT_S": str(settings.job_timeout_s),
            "LENS_LIMITS": settings.limits.model_dump_json(),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the supervisor dies, so nothing is orphaned (Linux)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Stack:
    settings: Settings
    redis: RedisServer | None = None
    api: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log_dir = self.log_dir or self.settings.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log = open(log_dir / log_name, "ab")  # noqa: SIM115 - handed to the child
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli.main", *args],
            env=child_env(self.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )

    def start(
        self, *, workers: int = 1, own_redis: bool = True, serves: list[str] | None = None
    ) -> Stack:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        if own_redis:
            self.redis = start_redis(self.settings.data_dir / "redis")
            self.settings = self.settings.model_copy(update={"redis_url": self.redis.url})
        for i in range(workers):
            self.spawn_worker(f"worker-{i}", serves)
        self.start_api()
        return self

    def start_api(self) -> None:
        self.api = self._spawn(["api"], "api.log")

    def stop_api(self) -> None:
        if self.api is not None:
            _stop(self.api)
            self.api = None

    def spawn_worker(self, name: str, serves: list[str] | None = None) -> subprocess.Popen[bytes]:
        args = ["worker", "--name", name]
        for model in serves or []:
            args += ["--serve", model]
        proc = self._spawn(args, f"{name}.log")
        self.workers[name] = proc
        return proc

    def wait_ready(self, timeout: float = 120.0, models: list[str] | None = None) -> None:
        """Until the API answers and a live worker holds each of ``models`` (default all)."""
        deadline = time.monotonic() + timeout
        keys = self.settings.key_values()
        headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
        while True:
            self._check_children()
            try:
                r = httpx.get(f"{self.url}/v1/models", headers=headers, timeout=2)
                listed = r.json()["models"] if r.status_code == 200 else []
                wanted = [m for m in listed if models is None or m["name"] in models]
                if wanted and all(m["worker_alive"] for m in wanted):
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the service was not ready within {timeout:.0f} s")
            time.sleep(0.2)

    def _check_children(self) -> None:
        for name, proc in [("api", self.api), *self.workers.items()]:
            if proc is not None and proc.poll() is not None:
                log_dir = self.log_dir or self.settings.data_dir / "logs"
                raise RuntimeError(
                    f"{name} exited with code {proc.returncode}; see {log_dir / (name + '.log')}"
                )

    def stop(self) -> None:
        """Stop in order: API, workers (SIGTERM: finish the current job), Redis."""
        self.stop_api()
        for w in self.workers.values():
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in self.workers.values():
            _stop(w, already_signalled=True)
        self.workers.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def _stop(proc: subprocess.Popen[bytes], *, already_signalled: bool = False) -> None:
    if proc.poll() is None and not already_signalled:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
