"""The client's request/response logic, free of I/O so the sync and async clients share it.

Each API call is described by a :class:`Call`; a transport (sync or async)
sends it, asks :class:`RetryPolicy` whether and when to try again, and hands
the last outcome to :func:`finish`, which decodes it or raises the matching
:mod:`app.client.errors` exception.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app import __version__
from app.client._tensors import TensorBackend
from app.client.errors import (
    Conflict,
    InvalidRequest,
    LensError,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    VersionMismatch,
)

DatasetSource = str | os.PathLike[str] | bytes | list[dict[str, str]]
CLIENT_HEADER = "X-Lens-Client"
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 30.0

_STATUS_ERRORS: dict[int, type[LensError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidRequest,
    426: VersionMismatch,
    429: QuotaExceeded,
    503: ServiceUnavailable,
}


@dataclass(frozen=True)
class Call:
    """One API request; ``raw`` asks for the body's bytes instead of decoded JSON."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bool = False
    held_s: float = 0
    """How long the server may hold the request before it answers (a waiting result)."""

    @property
    def idempotent(self) -> bool:
        return self.method in ("GET", "HEAD", "DELETE")

    def request_kwargs(self, timeout: httpx.Timeout) -> dict[str, Any]:
        """``httpx`` arguments; ``timeout`` is the client's, a held request's read longer."""
        kwargs: dict[str, Any] = {"method": self.method, "url": self.path}
        if self.held_s and timeout.read is not None:
            kwargs["timeout"] = stream_timeout(timeout, timeout.read + self.held_s)
        if self.params:
            kwargs["params"] = self.params
        if self.json is not None:
            kwargs["json"] = self.json
        if self.content is not None:
            kwargs["content"] = self.content
        if self.headers:
            kwargs["headers"] = self.headers
        return kwargs


@dataclass(frozen=True)
class ClientConfig:
    """Settings shared by the sync and async clients; unset ones come from the environment."""

    url: str
    api_key: str | None
    timeout: float
    tensors: TensorBackend
    progress: bool
    retry: RetryPolicy

    @classmethod
    def create(
        cls,
        url: str | None,
        api_key: str | None,
        timeout: float,
        tensors: TensorBackend,
        progress: bool,
        retry: RetryPolicy | None,
    ) -> ClientConfig:
        return cls(
            url=(url or os.environ.get("LENS_URL") or DEFAULT_URL).rstrip("/"),
            api_key=api_key if api_key is not None else os.environ.get("LENS_API_KEY") or None,
            timeout=timeout,
            tensors=tensors,
            progress=progress,
            retry=retry or RetryPolicy(),
        )

    def httpx_options(self) -> dict[str, Any]:
        return {
            "base_url": self.url,
            "headers": client_headers(self.api_key),
            "timeout": httpx.Timeout(self.timeout),
        }


def client_headers(api_key: str | None) -> dict[str, str]:
    headers = {CLIENT_HEADER: __version__, "User-Agent": f"lens-client/{__version__}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def submit_call(kind: str, model: str, params: dict[str, Any]) -> Call:
    return Call("POST", "/v1/jobs", json={**params, "kind": kind, "model": model})


def job_call(job_id: str) -> Call:
    return Call("GET", f"/v1/jobs/{job_id}")


def jobs_call(status: str | None = None, limit: int | None = None) -> Call:
    params = {k: v for k, v in (("status", status), ("limit", limit)) if v is not None}
    return Call("GET", "/v1/jobs", params=params)


def cancel_call(job_id: str) -> Call:
    return Call("DELETE", f"/v1/jobs/{job_id}")


def result_call(job_id: str, wait_s: float = 0) -> Call:
    """The result file; with ``wait_s``, the server answers once the job has ended, or
    after that long (409 if it has not succeeded by then)."""
    path = f"/v1/jobs/{job_id}/result"
    if not wait_s:
        return Call("GET", path, raw=True)
    return Call("GET", path, params={"wait": f"{wait_s:.3f}"}, raw=True, held_s=wait_s)


def models_call() -> Call:
    return Call("GET", "/v1/models")


def model_call(name: str) -> Call:
    return Call("GET", f"/v1/models/{name}")


def dataset_call(source: DatasetSource, fmt: str | None = None) -> Call:
    """Upload a data set: a .jsonl/.tsv path, rows of ``{"prompt", "target"}``, or bytes + fmt."""
    if isinstance(source, list):
        content = "".join(json.dumps(row) + "\n" for row in source).encode()
        fmt = fmt or "jsonl"
    elif isinstance(source, bytes):
        content = source
    else:
        content = Path(source).read_bytes()
        fmt = fmt or Path(source).suffix.lstrip(".").lower().replace("ndjson", "jsonl")
    if fmt not in ("jsonl", "tsv"):
        raise ValueError(f"data set format must be 'jsonl' or 'tsv', got {fmt!r}")
    content_type = "application/x-ndjson" if fmt == "jsonl" else "text/tab-separated-values"
    return Call(
        "POST",
        "/v1/datasets",
        params={"format": fmt},
        content=content,
        headers={"Content-Type": content_type},
    )


def events_path(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/events"


def stream_timeout(base: httpx.Timeout, read_s: float) -> httpx.Timeout:
    """The client's timeouts, but reads may wait ``read_s`` (the server sends keep-alives)."""
    return httpx.Timeout(connect=base.connect, read=read_s, write=base.write, pool=base.pool)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff, for failures that are safe to repeat.

    Connection refused (the request never reached the server) and 503 (the queue
    was unavailable, so nothing was queued) are retried for every method; broken
    connections only for idempotent ones.
    """

    attempts: int = 4
    backoff_s: float = 0.25
    max_delay_s: float = 4.0

    def delay(
        self, call: Call, attempt: int, outcome: httpx.Response | httpx.TransportError
    ) -> float | None:
        """Seconds to wait before try ``attempt + 2``, or None to stop and report ``outcome``."""
        if attempt + 1 >= self.attempts:
            return None
        backoff = min(self.backoff_s * 2**attempt, self.max_delay_s)
        if isinstance(outcome, httpx.ConnectError | httpx.ConnectTimeout):
            return backoff
        if isinstance(outcome, httpx.TransportError):
            return backoff if call.idempotent else None
        if outcome.status_code == 503:
            after = outcome.headers.get("Retry-After", "")
            return min(float(after), self.max_delay_s) if after.isdigit() else backoff
        return None


def finish(call: Call, outcome: httpx.Response | httpx.TransportError, url: str) -> Any:
    """The decoded answer of the last try, or the exception it calls for."""
    if isinstance(outcome, httpx.TransportError):
        raise ServiceUnavailable(
            f"cannot reach lens-server at {url}: {type(outcome).__name__}: {outcome}"
        ) from outcome
    return decode(call, outcome)


def decode(call: Call, response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise error_from_response(response)
    if call.raw:
        return response.content
    try:
        return response.json()
    except ValueError:
        kind = response.headers.get("content-type", "no content type")
        raise LensError(
            f"{response.request.url} answered {response.status_code} with {kind}, not JSON; "
            "is this URL a lens-server?",
            status=response.status_code,
        ) from None


def error_from_response(response: httpx.Response) -> LensError:
    """The exception for an error answer, carrying the server's message and status."""
    status = response.status_code
    try:
        body = json.loads(response.content)
        detail = body.get("detail", body) if isinstance(body, dict) else body
    except ValueError:
        detail = response.text.strip() or response.reason_phrase
    message = format_detail(detail)
    cls = _STATUS_ERRORS.get(status, ServerError if status >= 500 else LensError)
    if status == 400 and "version" in message.lower() and "client" in message.lower():
        cls = VersionMismatch
    if cls is VersionMismatch:
        message = f"this client is lens-server {__version__}; the server says: {message}"
    elif cls is Unauthorized:
        message += " (pass api_key=..., --api-key or set LENS_API_KEY)"
    return cls(message, status=status, detail=detail)


def format_detail(detail: Any) -> str:
    """FastAPI's 422 list of ``{loc, msg}`` as ``field: message`` lines; anything else as text."""
    if isinstance(detail, list) and all(isinstance(d, dict) and "msg" in d for d in detail):
        parts = []
        for d in detail:
            loc = [str(p) for p in d.get("loc", []) if p not in ("body", "query", "path")]
            parts.append(f"{'.'.join(loc)}: {d['msg']}" if loc else str(d["msg"]))
        return "; ".join(parts)
    return detail if isinstance(detail, str) else json.dumps(detail)


@dataclass(frozen=True)
class ServerEvent:
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


class SSEParser:
    """Turns the lines of a ``text/event-stream`` into events (the WHATWG rules we need)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> ServerEvent | None:
        """Consume one line (without its newline); return an event when a blank line ends one."""
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = ServerEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None
