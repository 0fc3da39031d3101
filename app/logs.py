"""Structured logs: one line per record, key=value (or JSON), with the job id on every line
logged while a job is being handled.

The job id travels in a context variable: the worker sets it around each job, the API
around each request that names a job, so library code (RQ, transformers, ours) needs no
change to be attributed. Secrets never reach the output: a filter masks the API keys
the process knows, wherever they appear in a message.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

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
