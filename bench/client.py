"""What a user of the service does, timed: submit, wait on the event stream, download."""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

_CHUNK = 1 << 20


@dataclass(frozen=True)
class RoundTrip:
    """One job from submission to its downloaded result."""

    job_id: str
    seconds: float
    result_bytes: int


class BenchClient:
    """Plain HTTP (no client library), so the figures are the service's own."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=600)
        parsed = urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self._local = threading.local()

    def close(self) -> None:
        self.http.close()
        if getattr(self._local, "conn", None) is not None:
            self._local.conn.close()

    def submit(self, body: dict[str, Any]) -> str:
        r = self.http.post("/v1/jobs", json=body)
        if r.status_code != 202:
            raise RuntimeError(f"submit failed: {r.status_code} {r.text}")
        return r.json()["id"]

    def wait(self, job_id: str) -> dict[str, Any]:
        """Follow the job's server-sent events until it ends (no polling)."""
        event = None
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event == "status":
                    doc = json.loads(line.removeprefix("data: "))
                    if doc["status"] in ("succeeded", "failed", "cancelled"):
                        if doc["status"] != "succeeded":
                            raise RuntimeError(f"job {job_id} {doc['status']}: {doc['error']}")
                        return doc
        raise RuntimeError(f"the event stream of {job_id} ended early")

    def download(self, job_id: str) -> int:
        """Stream the result into a reused buffer and drop it; returns its size in bytes.

        Through the standard library's ``http.client``: httpx parses the body in Python
        and tops out near 150 MiB/s on a small machine, which would measure the client.
        Each thread keeps its connection open between downloads, as any HTTP client does,
        and opens a new one when the server has closed the idle one.
        """
        local = self._local
        if getattr(local, "conn", None) is None:
            local.buffer = memoryview(bytearray(_CHUNK))
        else:
            try:
                return self._download(local.conn, job_id)
            except (http.client.RemoteDisconnected, ConnectionError):
                local.conn.close()  # closed by the server while idle: once more, anew
        local.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        return self._download(local.conn, job_id)

    def _download(self, conn: http.client.HTTPConnection, job_id: str) -> int:
        try:
            conn.request("GET", f"/v1/jobs/{job_id}/result")
            r = conn.getresponse()
            if r.status != 200:
                raise RuntimeError(f"download failed: {r.status} {r.read()!r}")
            size = 0
            while read := r.readinto(self._local.buffer):
                size += read
            return size
        except BaseException:
            conn.close()
            raise

    def round_trip(self, body: dict[str, Any]) -> RoundTrip:
        started = time.perf_counter()
        job_id = self.submit(body)
        self.wait(job_id)
        size = self.download(job_id)
        return RoundTrip(job_id, time.perf_counter() - started, size)
