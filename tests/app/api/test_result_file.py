"""Result downloads: the same bytes at every size, from the page cache or from disk, and
starlette's HEAD and Range handling kept."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from app.api import result_file
from app.api.result_file import CHUNK_BYTES, FileChunks
from app.blobstore import BlobStore
from app.core.config import ModelSpec, Settings
from app.core.redis_server import RedisServer
from app.jobstore import ANONYMOUS, JobStore
from app.main import create_app
from app.schemas import JobStatus
from tests.conftest import api_client
from tests.waiting import wait_until


@contextmanager
def _result(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path, content: bytes
) -> Iterator[tuple[TestClient, str, BlobStore]]:
    store = JobStore(redis_conn)
    blobs = BlobStore(tmp_path / "results")
    job_id = store.create(kind="score", model="m", owner=ANONYMOUS, params={}).id
    store.start(job_id, "w")
    blobs.path(job_id).parent.mkdir(parents=True, exist_ok=True)
    blobs.path(job_id).write_bytes(content)
    assert store.finish(job_id, JobStatus.SUCCEEDED, ttl_s=100)
    with api_client(redis_server, tmp_path, keys=[], results_dir=blobs.root) as client:
        yield client, job_id, blobs


@pytest.mark.parametrize(
    "size", [0, 10, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 5 * CHUNK_BYTES + 3]
)
def test_results_of_every_size_come_back_whole(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path, size: int
) -> None:
    content = os.urandom(size)
    with _result(redis_server, redis_conn, tmp_path, content) as (client, job_id, blobs):
        r = client.get(f"/v1/jobs/{job_id}/result")
        assert r.status_code == 200 and r.content == content
        assert r.headers["content-length"] == str(size)
        assert r.headers["content-type"] == "application/octet-stream"
        disposition = r.headers["content-disposition"]
        assert disposition == f'attachment; filename="score-{job_id}.safetensors"'
        blobs.delete(job_id)
        assert client.get(f"/v1/jobs/{job_id}/result").status_code == 404


def test_head_and_range_requests_are_answered_as_by_a_file_response(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    content = os.urandom(3 * CHUNK_BYTES)
    with _result(redis_server, redis_conn, tmp_path, content) as (client, job_id, _):
        url = f"/v1/jobs/{job_id}/result"
        head = client.head(url)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(content))
        part = client.get(url, headers={"Range": f"bytes=10-{CHUNK_BYTES + 9}"})
        assert part.status_code == 206 and part.content == content[10 : CHUNK_BYTES + 10]
        assert part.headers["content-range"] == f"bytes 10-{CHUNK_BYTES + 9}/{len(content)}"


def test_a_file_read_from_disk_comes_back_whole(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """Evicted from the page cache, the file is read in a thread, not in the event loop."""
    content = os.urandom(2 * CHUNK_BYTES + 5)
    path = tmp_path / "blob"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)

        def dropped() -> bool:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return not result_file._cached(fd, 0, CHUNK_BYTES)

        try:  # pages still in another CPU's LRU batch are not dropped at once
            wait_until(dropped, 1, "the file's pages dropped from the cache")
        except AssertionError:
            pytest.skip("this file system keeps the file cached")
        chunks = FileChunks(fd)
        assert asyncio.run(chunks.read(0, CHUNK_BYTES)) == content[:CHUNK_BYTES]
        assert result_file._cached(fd, 0, CHUNK_BYTES)  # read once, it is cached now
        tail = asyncio.run(chunks.read(2 * CHUNK_BYTES, CHUNK_BYTES))
        assert tail == content[2 * CHUNK_BYTES :]  # fewer bytes at the end of the file
    finally:
        os.close(fd)


def test_cached_chunks_are_views_of_the_file_that_outlive_it(tmp_path: Path) -> None:
    """A cached chunk is sent from a mapping of the file, not copied: the view stays
    valid after the file is closed and its pages are dropped from the mapping (the
    transport may still hold it then), and after the file is unlinked."""
    if result_file._NOWAIT is None:
        pytest.skip("no RWF_NOWAIT: every chunk is read in a thread")
    content = os.urandom(3 * CHUNK_BYTES)
    path = tmp_path / "blob"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = FileChunks(fd)
        views = [asyncio.run(chunks.read(i * CHUNK_BYTES, CHUNK_BYTES)) for i in range(3)]
        assert all(isinstance(view, memoryview) for view in views)
        chunks.sent(0, 2 * CHUNK_BYTES)
    finally:
        os.close(fd)
    path.unlink()
    del chunks
    assert b"".join(views) == content


def test_without_nowait_reads_every_chunk_in_a_thread(
    redis_server: RedisServer,
    redis_conn: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where RWF_NOWAIT is missing (not Linux), nothing counts as cached."""
    monkeypatch.setattr(result_file, "_NOWAIT", None)
    content = os.urandom(CHUNK_BYTES + 7)
    with _result(redis_server, redis_conn, tmp_path, content) as (client, job_id, _):
        assert client.get(f"/v1/jobs/{job_id}/result").content == content


def test_where_files_cannot_be_mapped_every_chunk_is_read(
    redis_server: RedisServer,
    redis_conn: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file system that cannot map files (ENODEV): the download reads each chunk."""
    refused: list[int] = []

    def refuse(fd: int, *args: object, **kwargs: object) -> None:
        refused.append(fd)
        raise OSError(errno.ENODEV, "this file system cannot map files")

    monkeypatch.setattr(result_file.mmap, "mmap", refuse)
    content = os.urandom(2 * CHUNK_BYTES + 3)
    with _result(redis_server, redis_conn, tmp_path, content) as (client, job_id, _):
        assert client.get(f"/v1/jobs/{job_id}/result").content == content
    assert refused or result_file._NOWAIT is None


def test_every_openapi_operation_has_its_own_id() -> None:
    """GET and HEAD of a result are two operations; client generators need distinct ids."""
    spec = create_app(Settings(models={"m": ModelSpec(source="/nowhere")})).openapi()
    ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))
    assert {"get", "head"} <= set(spec["paths"]["/v1/jobs/{job_id}/result"])
