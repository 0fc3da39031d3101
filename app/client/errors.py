"""Exceptions of the client: one base class, one subclass per kind of answer a caller handles.

The server's HTTP status is mapped back to these (the reverse of the API's
exception handler), so callers catch ``NotFound`` rather than compare codes.
"""

from __future__ import annotations

from typing import Any


class LensError(Exception):
    """Base of every error the client raises; ``status`` is the HTTP status, if any."""

    def __init__(self, message: str, *, status: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.detail = detail

    def __str__(self) -> str:
        return self.message if self.status is None else f"[{self.status}] {self.message}"


class InvalidRequest(LensError):
    """The server rejected the request's parameters (400, 422)."""


class PayloadTooLarge(InvalidRequest):
    """The request exceeds an operator limit (413)."""


class VersionMismatch(InvalidRequest):
    """The server cannot serve this client version (426, or 400 naming the versions)."""


class Unauthorized(LensError):
    """Missing or wrong API key (401), or not allowed (403)."""


class NotFound(LensError):
    """Unknown job, model or data set, or one that belongs to another key (404)."""


class Conflict(LensError):
    """The job's state forbids the request (409): a result before success, say."""


class QuotaExceeded(LensError):
    """The key's running-job quota is used up (429); retry once a job ends."""


class ServiceUnavailable(LensError):
    """The server or its queue could not be reached, even after retrying (503, refused)."""


class ServerError(LensError):
    """An unexpected server failure (5xx); a bug on the server side."""


class WaitTimeout(LensError, TimeoutError):
    """The job did not end within the time the caller was willing to wait."""


class JobFailed(LensError):
    """The job ended without a result; ``error_type`` and ``job_id`` say which and why."""

    def __init__(self, job_id: str, status: str, error_type: str | None, message: str) -> None:
        super().__init__(f"job {job_id} {status}: {error_type or 'error'}: {message}")
        self.job_id = job_id
        self.job_status = status
        self.error_type = error_type
        self.error_message = message


class JobCancelled(JobFailed):
    """The job was cancelled before it produced a result."""
