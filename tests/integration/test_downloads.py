"""A result download on the real server (uvicorn): a client that hangs up mid-download
stops the reading of its file."""

from __future__ import annotations

import http.client
from pathlib import Path

import redis

from app.blobstore import BlobStore
from app.jobstore import ANONYMOUS, JobStore
from app.schemas import JobStatus, TensorInfo
from app.stack import Stack
from tests.waiting import wait_until

MIB = 1 << 20


def _read_bytes(pid: int) -> int:
    """Bytes the process has read with read-like system calls (``rchar``)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/PID/io")


def test_a_client_that_hangs_up_stops_the_download(service: Stack) -> None:
    assert service.api is not None
    size = 128 * MIB
    conn = redis.Redis.from_url(service.settings.redis_url)
    store = JobStore(conn)
    job_id = store.create(kind="score", model="demo", owner=ANONYMOUS, params={}).id
    blobs = BlobStore(service.settings.blob_dir)
    blobs.path(job_id).parent.mkdir(parents=True, exist_ok=True)
    with blobs.path(job_id).open("wb") as f:
        f.truncate(size)  # sparse: reads of it cost no disk
    store.start(job_id, "test")
    info = {"blob": TensorInfo(dtype="uint8", shape=[size])}
    assert store.finish(job_id, JobStatus.SUCCEEDED, summary={}, tensors=info, ttl_s=600)
    try:
        before = _read_bytes(service.api.pid)
        client = http.client.HTTPConnection("127.0.0.1", service.settings.port, timeout=30)
        client.request("GET", f"/v1/jobs/{job_id}/result")
        response = client.getresponse()
        assert response.status == 200 and response.getheader("content-length") == str(size)
        assert len(response.read(MIB)) == MIB
        client.sock.shutdown(2)  # hang up, mid-download
        client.close()
        api_log = service.settings.data_dir / "logs" / "api.log"
        wait_until(
            lambda: f"GET /v1/jobs/{job_id}/result 200" in api_log.read_text(),
            30,
            "the API ended the abandoned download (its access line is written at the end)",
        )
        read = _read_bytes(service.api.pid) - before
        assert read < size / 4, f"the API read {read / MIB:.0f} MiB of a download abandoned at 1"
        again = http.client.HTTPConnection("127.0.0.1", service.settings.port, timeout=30)
        again.request("GET", "/healthz")
        assert again.getresponse().status == 200
        again.close()
    finally:
        blobs.delete(job_id)
        conn.close()
