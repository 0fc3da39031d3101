"""Structured logs: one line per record, key=value (or JSON), with the job id on every line
logged while a job is being handled.

The job id travels in a context variable: the worker sets it around each job, the API
around each request that names a job, so library code (RQ, transformers, ours) needs no
change to be attributed. Secrets never reach the output: a filter masks the API keys
and the Redis password the process knows, wherever they appear in a message.

Under ``lens serve`` each child's output (ours, and whatever a library or the
interpreter prints) goes through a pipe to the supervisor, which appends it to the
child's file, 0600, rotated when it reaches a size: the logs of a long-lived server
never fill the disk.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

job_id_var: ContextVar[str | None] = ContextVar("lens_job_id", default=None)
MASK = "***"


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Attribute every log line in this block to ``job_id``."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)


class _Context(logging.Filter):
    """Adds ``component`` and ``job_id`` to every record; masks secrets in the message."""

    def __init__(self, component: str, secrets: Iterable[str]) -> None:
        super().__init__()
        self.component = component
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        record.component = self.component
        record.job_id = getattr(record, "job_id", None) or job_id_var.get()
        if self.secrets:
            message = record.getMessage()
            masked = message
            for secret in self.secrets:
                masked = masked.replace(secret, MASK)
            if masked != message:
                record.msg, record.args = masked, None
        return True


def _fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, str]:
    fields = {
        "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "component": getattr(record, "component", ""),
        "logger": record.name,
        "job": getattr(record, "job_id", None) or "-",
        "msg": record.getMessage(),
    }
    if record.exc_info:
        fields["exc"] = formatter.formatException(record.exc_info)
    return fields


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=info component=worker logger=… job=<id> msg="…"``: grep-able, one line."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_quote(v)}" for k, v in _fields(record, self).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record, self))


def _quote(value: str) -> str:
    if value and not any(c in value for c in ' "=\n\t'):
        return value
    return json.dumps(value)


def configure_logging(
    component: str, *, fmt: str = "kv", level: str = "INFO", secrets: Iterable[str] = ()
) -> None:
    """Replace the root handlers with one structured handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(_Context(component, secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class RotatingFile:
    """Bytes appended to ``path`` (0600); once it holds ``max_bytes``, it becomes
    ``path.1`` (``path.1`` becomes ``path.2``, …) and a new file starts; ``keep`` old
    files are kept, the oldest dropped."""

    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        if max_bytes < 1 or keep < 0:
            raise ValueError(f"max_bytes must be ≥ 1 and keep ≥ 0, got {max_bytes}, {keep}")
        self.path, self.max_bytes, self.keep = path, max_bytes, keep
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = self._open()

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        return fd

    def write(self, data: bytes) -> None:
        if os.fstat(self._fd).st_size + len(data) > self.max_bytes:
            self._rotate()
        os.write(self._fd, data)

    def _rotate(self) -> None:
        os.close(self._fd)
        for i in range(self.keep, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i - 1}") if i > 1 else self.path
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i}"))
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
        self._fd = self._open()

    def close(self) -> None:
        os.close(self._fd)


def drain(stream: IO[bytes], sink: RotatingFile) -> threading.Thread:
    """A thread that copies ``stream`` (a child's output) into ``sink`` line by line until
    the child closes it; a failed write (disk full) drops the line, never stops the child."""

    def run() -> None:
        try:
            for line in stream:
                with suppress(OSError):
                    sink.write(line)
        finally:
            stream.close()
            sink.close()

    thread = threading.Thread(target=run, name=f"log:{sink.path.name}", daemon=True)
    thread.start()
    return thread
