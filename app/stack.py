"""Run the whole service on one machine: Redis, N workers and the API as child processes.

Used by ``lens serve``, ``lens demo`` and the integration tests. Children run in
their own sessions so that Ctrl-C reaches only the supervisor, which then stops
them in order: the API first (no new jobs), the workers (each finishes or
fails its job), Redis last (flushing its append-only file). Each child also ends
when the supervisor dies without stopping it (:mod:`app.core.lifetime`).

The Redis it starts has a password, made once and kept (0600) beside Redis' files in
the data directory (0700); the children get it in their environment, which no other
user can read, never on a command line. Only the API gets the API keys. Each child's
output goes to its own log file in ``DATA_DIR/logs``, rotated by size.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import httpx

from app.core.config import Settings
from app.core.lifetime import die_with_parent
from app.core.redis_server import (
    RedisServer,
    private_dir,
    redacted,
    start_redis,
    stored_password,
)
from app.logs import RotatingFile, drain

STOP_TIMEOUT_S = 30.0
QUICK_EXIT_S = 30.0
MAX_QUICK_EXITS = 3
DRAIN_JOIN_S = 5.0
PRIVATE_UMASK = 0o077
"""Every file a child makes is its user's alone (blobs, data sets, Redis' files, logs)."""
_KEY_VARIABLES = ("LENS_API_KEYS", "LENS_API_KEYS_FILE")


def child_env(settings: Settings, *, keys: bool = True) -> dict[str, str]:
    """The environment that hands ``settings`` to a child process (every setting, so the
    children agree with the supervisor whatever its config file or flags said). Without
    ``keys`` (workers), no API key, whether from the settings or the supervisor's own
    environment."""
    env = {k: v for k, v in os.environ.items() if keys or k not in _KEY_VARIABLES}
    resolved = settings.model_copy(update={"data_dir": settings.data_dir.resolve()})
    env.update(resolved.environment(keys=keys))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def worker_names(settings: Settings, count: int, serves: list[str] | None = None) -> list[str]:
    """One worker per name the config assigns models to (e.g. one per GPU); else
    ``worker-0`` … ``worker-{count-1}``, each serving every model (or ``serves``)."""
    assigned = sorted({w for spec in settings.models.values() for w in spec.workers or []})
    if assigned and not serves:
        return assigned
    return [f"worker-{i}" for i in range(count)]


class ChildExited(RuntimeError):
    """A child process of the stack exited while it should be running."""


@dataclass
class Stack:
    settings: Settings
    redis: RedisServer | None = None
    api: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: Path | None = None
    instance: str = field(default_factory=lambda: secrets.token_hex(8))
    """Handed to the API, which reports it in /healthz: readiness is checked against our
    own API, never another server that holds the port."""
    _serves: dict[str, list[str] | None] = field(default_factory=dict, init=False)
    _started: dict[str, float] = field(default_factory=dict, init=False)
    _drains: dict[str, threading.Thread] = field(default_factory=dict, init=False)

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    def _log(self, name: str) -> Path:
        return (self.log_dir or self.settings.data_dir / "logs") / f"{name}.log"

    def _sink(self, name: str) -> RotatingFile:
        return RotatingFile(
            self._log(name), self.settings.log_max_mib * 1024 * 1024, self.settings.log_files_kept
        )

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        sink = self._sink(name)
        self._started[name] = time.monotonic()
        api = name == "api"
        settings = (
            self.settings.model_copy(update={"instance": self.instance}) if api else self.settings
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli.main", *args],
            env=child_env(settings, keys=api),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(umask=PRIVATE_UMASK),
        )
        self._drains[name] = drain(cast(IO[bytes], proc.stdout), sink)
        return proc

    def start(
        self, *, workers: int = 1, own_redis: bool = True, serves: list[str] | None = None
    ) -> Stack:
        """Redis (its files in the data directory, so a new stack on the same directory
        finds every job), the workers, then the API."""
        private_dir(self.settings.data_dir)
        if self.settings.results_dir is not None:
            private_dir(self.settings.results_dir)
        if own_redis:
            self.redis = self._start_redis()
            self.settings = self.settings.model_copy(update={"redis_url": self.redis.url})
        names = worker_names(self.settings, workers, serves)
        if "local_workers" not in self.settings.model_fields_set:  # they share these cores
            self.settings = self.settings.model_copy(update={"local_workers": max(1, len(names))})
        for name in names:
            self.spawn_worker(name, serves)
        self.start_api()
        return self

    def _start_redis(self, port: int | None = None) -> RedisServer:
        """Our Redis, with its password (the one kept in its directory): on ``port``, when
        it is started again after it died, so that every client's URL stays right."""
        directory = self.settings.data_dir / "redis"
        server = start_redis(
            directory, port, password=stored_password(directory), output=subprocess.PIPE
        )
        self._started["redis"] = time.monotonic()
        server.drain = drain(cast(IO[bytes], server.process.stdout), self._sink("redis"))
        return server

    @property
    def redis_display(self) -> str:
        """The Redis URL without its password, for messages."""
        return redacted(self.settings.redis_url)

    def _own_api(self) -> bool:
        """Whether our API answers /healthz (Redis included) at our URL, not another server
        that holds the port."""
        try:
            r = httpx.get(f"{self.url}/healthz", timeout=2)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and _json(r).get("instance") == self.instance

    def wait_api(self, timeout: float = 60.0) -> None:
        """Until our API answers /healthz (Redis included); workers may still be loading."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_children()
            if self._own_api():
                return
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

    def wait_ready(self, timeout: float = 120.0, models: list[str] | None = None) -> dict[str, str]:
        """Until our API answers and each of ``models`` (default all) is either held by a
        live worker or failed to load; returns the failed ones, with the reason of each."""
        deadline = time.monotonic() + timeout
        keys = self.settings.key_values()
        headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
        while True:
            self._check_children()
            if self._own_api():
                try:
                    r = httpx.get(f"{self.url}/v1/models", headers=headers, timeout=2)
                    listed = _json(r).get("models", []) if r.status_code == 200 else []
                except httpx.HTTPError:
                    listed = []
                wanted = [m for m in listed if models is None or m["name"] in models]
                if wanted and all(m["status"] in ("ready", "failed") for m in wanted):
                    return {m["name"]: m["error"] for m in wanted if m["status"] == "failed"}
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
            if self.redis is not None and self.redis.process.poll() is not None:
                ran = time.monotonic() - self._started["redis"]
                quick["redis"] = quick["redis"] + 1 if ran < QUICK_EXIT_S else 0
                exited = self._exited("redis", self.redis.process, self.redis.drain)
                if quick["redis"] >= MAX_QUICK_EXITS:
                    raise ChildExited(f"{exited}\nit keeps exiting: stopping")
                report(f"{exited}\nstarting redis again, on port {self.redis.port}")
                try:
                    self.redis = self._start_redis(self.redis.port)
                except RuntimeError as exc:
                    raise ChildExited(f"{exited}\nit cannot start again: {exc}") from None
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

    def _exited(
        self, name: str, proc: subprocess.Popen[bytes], output: threading.Thread | None = None
    ) -> str:
        """Its exit code and last line (once its output has all reached its log)."""
        output = output or self._drains.get(name)
        if output is not None:
            output.join(DRAIN_JOIN_S)
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
            if self.redis.drain is not None:
                self.redis.drain.join(DRAIN_JOIN_S)
            self.redis = None
        for output in self._drains.values():
            output.join(DRAIN_JOIN_S)


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


def _json(response: httpx.Response) -> dict[str, Any]:
    """The response's JSON object, or an empty one (another server may answer anything)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
