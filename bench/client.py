"""What a user of the service does, timed: submit, then one result request that waits for
the job (or: wait on the event stream, then download)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from app.api.routes.jobs import MAX_RESULT_WAIT_S

_CHUNK = 1 << 20
_FINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class RoundTrip:
    """One job from submission to its downloaded result."""

    job_id: str
    seconds: float
    result_bytes: int


class BenchClient:
    """Plain HTTP through the standard library's ``http.client``, so the figures are the
    service's own: httpx spends 1–3 ms of Python per request on a small machine and parses
    a body near 150 MiB/s, which would measure the client. Each thread keeps one
    connection open between requests, as any HTTP client does, and opens a new one when
    the server has closed the idle one."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        parsed = urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._local = threading.local()
        self._opened: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()

    def get_json(self, path: str) -> Any:
        return self._exchange("GET", path, None, _json_of)

    def submit(self, body: dict[str, Any]) -> str:
        payload = json.dumps(body).encode()
        return self._exchange("POST", "/v1/jobs", payload, _json_of, expect=202)["id"]

    def wait(self, job_id: str) -> dict[str, Any]:
        """Follow the job's server-sent events until it ends (no polling)."""
        return self._exchange("GET", f"/v1/jobs/{job_id}/events", None, _final_status)

    def download(self, job_id: str, wait_s: float = 0) -> int:
        """Stream the result into a reused buffer and drop it; returns its size in bytes.
        With ``wait_s``, the request first waits that long at most for the job to end."""
        query = f"?wait={wait_s:g}" if wait_s else ""
        return self._exchange("GET", f"/v1/jobs/{job_id}/result{query}", None, self._drain)

    def fetch(self, job_id: str, wait_s: float = MAX_RESULT_WAIT_S) -> bytes:
        """The whole result file, after one request that waits ``wait_s`` at most for the job."""
        return self._exchange("GET", f"/v1/jobs/{job_id}/result?wait={wait_s:g}", None, _body_of)

    def round_trip(self, body: dict[str, Any], *, follow_events: bool = False) -> RoundTrip:
        """Submit, then one result request that waits for the job; with ``follow_events``,
        wait on the event stream and download after it (as a client showing progress)."""
        started = time.perf_counter()
        job_id = self.submit(body)
        if follow_events:
            self.wait(job_id)
            size = self.download(job_id)
        else:
            size = self.download(job_id, wait_s=MAX_RESULT_WAIT_S)  # a CHG job takes minutes
        return RoundTrip(job_id, time.perf_counter() - started, size)

    def _exchange(
        self,
        method: str,
        path: str,
        body: bytes | None,
        read: Any,
        expect: int = 200,
    ) -> Any:
        """One request on this thread's connection; once more on a new connection if the
        server had closed the idle one (it then never saw the request)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                return self._request(conn, method, path, body, read, expect, self._auth)
            except (http.client.RemoteDisconnected, ConnectionError):
                conn.close()
        self._local.conn = conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        with self._lock:
            self._opened.append(conn)
        return self._request(conn, method, path, body, read, expect, self._auth)

    @staticmethod
    def _request(
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        body: bytes | None,
        read: Any,
        expect: int,
        auth: dict[str, str],
    ) -> Any:
        headers = {"Content-Type": "application/json", **auth} if body is not None else auth
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            if r.status != expect:
                raise RuntimeError(f"{method} {path}: {r.status} {r.read()!r}")
            out = read(r)
            r.read()  # the rest of the body (an event stream's end), so the connection is reusable
            return out
        except BaseException:
            conn.close()
            raise

    def _drain(self, r: http.client.HTTPResponse) -> int:
        buffer = getattr(self._local, "buffer", None)
        if buffer is None:
            self._local.buffer = buffer = memoryview(bytearray(_CHUNK))
        size = 0
        while read := r.readinto(buffer):
            size += read
        return size


def _body_of(r: http.client.HTTPResponse) -> bytes:
    return r.read()


def _json_of(r: http.client.HTTPResponse) -> Any:
    return json.loads(r.read())


def _final_status(r: http.client.HTTPResponse) -> dict[str, Any]:
    event = None
    while line := r.readline():
        text = line.decode().rstrip("\r\n")
        if text.startswith("event: "):
            event = text.removeprefix("event: ")
        elif text.startswith("data: ") and event == "status":
            doc = json.loads(text.removeprefix("data: "))
            if doc["status"] in _FINAL:
                if doc["status"] != "succeeded":
                    raise RuntimeError(f"job {doc['id']} {doc['status']}: {doc['error']}")
                return dict(doc)
    raise RuntimeError("the event stream ended before the job did")
