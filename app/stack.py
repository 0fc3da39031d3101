"""Run the whole service on one machine: Redis, N workers and the API as child processes.

Used by ``lens serve``, ``lens demo`` and the integration tests. Children run in
their own sessions so that Ctrl-C reaches only the supervisor, which then stops
them in order: the API first (no new jobs), the workers (each finishes or
fails its job), Redis last (flushing its append-only file).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.core.config import Settings
from app.core.redis_server import RedisServer, start_redis

STOP_TIMEOUT_S = 30.0
QUICK_EXIT_S = 30.0
MAX_QUICK_EXITS = 3


def child_env(settings: Settings) -> dict[str, str]:
    """The environment that hands ``settings`` to a child process (every setting, so the
    children agree with the supervisor whatever its config file or flags said)."""
    env = dict(os.environ)
    env.update(settings.model_copy(update={"data_dir": settings.data_dir.resolve()}).environment())
    env["PYTHONUNBUFFERED"] = "1"
    return env


def worker_names(settings: Settings, count: int, serves: list[str] | None = None) -> list[str]:
    """One worker per name the config assigns models to (e.g. one per GPU); else
    ``worker-0`` … ``worker-{count-1}``, each serving every model (or ``serves``)."""
    assigned = sorted({w for spec in settings.models.values() for w in spec.workers or []})
    if assigned and not serves:
        return assigned
    return [f"worker-{i}" for i in range(count)]


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the supervisor dies, so nothing is orphaned (Linux)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ChildExited(RuntimeError):
    """A child process of the stack exited while it should be running."""


@dataclass
class Stack:
    settings: Settings
    redis: RedisServer | None = None
    api: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: Path | None = None
    _serves: dict[str, list[str] | None] = field(default_factory=dict, init=False)
    _started: dict[str, float] = field(default_factory=dict, init=False)

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    def _log(self, name: str) -> Path:
        return (self.log_dir or self.settings.data_dir / "logs") / f"{name}.log"

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        path = self._log(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._started[name] = time.monotonic()
        log = open(path, "ab")  # noqa: SIM115 - handed to the child
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
        """Redis (its files in the data directory, so a new stack on the same directory
        finds every job), the workers, then the API."""
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        if own_redis:
            self.redis = start_redis(self.settings.data_dir / "redis")
            self.settings = self.settings.model_copy(update={"redis_url": self.redis.url})
        names = worker_names(self.settings, workers, serves)
        if "local_workers" not in self.settings.model_fields_set:  # they share these cores
            self.settings = self.settings.model_copy(update={"local_workers": max(1, len(names))})
        for name in names:
            self.spawn_worker(name, serves)
        self.start_api()
        return self

    def wait_api(self, timeout: float = 60.0) -> None:
        """Until the API answers /healthz (Redis included); workers may still be loading."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_children()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API did not answer within {timeout:.0f} s")
            time.sleep(0.1)

    def start_api(self) -> None:
        self.api = self._spawn(["api"], "api")

    def stop_api(self) -> None:
        if self.api is not None:
            _stop(self.api)
            self.api = None

    def spawn_worker(self, name: str, serves: list[str] | None = None) -> subprocess.Popen[bytes]:
        args = ["worker", "--name", name]
        for model in serves or []:
            args += ["--serve", model]
        proc = self._spawn(args, name)
        self.workers[name] = proc
        self._serves[name] = serves
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

    def supervise(self, report: Callable[[str], None], poll_s: float = 1.0) -> None:
        """Until interrupted, start again each child that exits (a worker's unfinished job
        is settled when it is back). One that keeps exiting within ``QUICK_EXIT_S`` of its
        start, ``MAX_QUICK_EXITS`` times in a row, is not: :class:`ChildExited`."""
        quick: Counter[str] = Counter()
        while True:
            time.sleep(poll_s)
            for name, proc in self._children():
                if proc.poll() is None:
                    continue
                ran = time.monotonic() - self._started[name]
                quick[name] = quick[name] + 1 if ran < QUICK_EXIT_S else 0
                if quick[name] >= MAX_QUICK_EXITS:
                    raise ChildExited(f"{self._exited(name, proc)}\nit keeps exiting: stopping")
                report(f"{self._exited(name, proc)}\nstarting {name} again")
                if name == "api":
                    self.start_api()
                else:
                    self.spawn_worker(name, self._serves[name])

    def _children(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        api = [("api", self.api)] if self.api is not None else []
        return [*api, *self.workers.items()]

    def _exited(self, name: str, proc: subprocess.Popen[bytes]) -> str:
        log = self._log(name)
        return (
            f"{name} exited with code {proc.returncode}: {_last_line(log)}\n(its whole log: {log})"
        )

    def _check_children(self) -> None:
        for name, proc in self._children():
            if proc.poll() is not None:
                raise ChildExited(self._exited(name, proc))

    def stop(self) -> None:
        """Stop in order: API, workers (SIGTERM: finish the current job), Redis."""
        self.stop_api()
        for w in self.workers.values():
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in self.workers.values():
            _stop(
                w, already_signalled=True, timeout=self.settings.shutdown_grace_s + STOP_TIMEOUT_S
            )
        self.workers.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def _stop(
    proc: subprocess.Popen[bytes],
    *,
    already_signalled: bool = False,
    timeout: float = STOP_TIMEOUT_S,
) -> None:
    if proc.poll() is None and not already_signalled:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _last_line(log: Path, tail_bytes: int = 8192) -> str:
    """The log's last line, where a child says why it stopped."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"
