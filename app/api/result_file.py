"""A result file sent from the page cache without a thread hop or a copy per chunk.

Starlette's ``FileResponse`` reads every chunk in a worker thread. For a result the
worker has just written, the data is in the page cache, so those hops are most of the
cost. A chunk that ``RWF_NOWAIT`` probes find in the page cache is not even read: the
socket takes it straight from a mapping of the file, which saves a copy. A chunk not
cached (an old result evicted to disk), or any chunk without ``RWF_NOWAIT``, is read in
a thread, so the loop never waits on the disk (the measurements: docs/performance.md,
"Figures behind code choices"). Result files are never changed in place (written aside, then
renamed), so a mapping never sees its file shrink.
"""

from __future__ import annotations

import asyncio
import mmap
import os

import anyio
import anyio.lowlevel
from starlette.datastructures import Headers
from starlette.responses import FileResponse
from starlette.types import Receive, Scope, Send

CHUNK_BYTES = 1 << 20
"""Sent at a time: the fastest size measured (docs/performance.md)."""

_NOWAIT = getattr(os, "RWF_NOWAIT", None)  # Linux ≥ 4.14


class ResultFile(FileResponse):
    """``FileResponse`` (its headers, ``Range`` requests) with whole-file ``GET`` bodies
    read as the module says; memory stays one chunk per download."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "GET" or "range" in Headers(scope=scope):
            await super().__call__(scope, receive, send)
            return
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                await self._stream(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            # the server drops what is sent after a disconnect: stop reading then
            while (await receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

    async def _stream(self, send: Send) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if self.stat_result is None:
                self.stat_result = os.fstat(fd)
                self.set_stat_headers(self.stat_result)
            size, offset = self.stat_result.st_size, 0
            chunks = FileChunks(fd)
            start = {"type": "http.response.start", "status": self.status_code}
            await send(start | {"headers": self.raw_headers})
            more = True
            while more:  # one body message at least, for an empty file too
                length = min(CHUNK_BYTES, size - offset)
                chunk = await chunks.read(offset, length) if length else b""
                if len(chunk) < length:
                    raise RuntimeError(f"{self.path} ended at {offset + len(chunk)} of {size}")
                more = offset + length < size
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
                if offset:
                    chunks.sent(offset - CHUNK_BYTES, CHUNK_BYTES)
                offset += length
                if more:
                    # a cached chunk and a send into free socket buffer never suspend: let
                    # the disconnect watcher and other requests run between chunks
                    await anyio.lowlevel.checkpoint()
        finally:
            os.close(fd)


class FileChunks:
    """Ranges of an open file: views of one read-only mapping where the page cache holds
    them, reads in a thread otherwise."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._mapping = _map(fd)

    async def read(self, offset: int, length: int) -> bytes | memoryview:
        """``length`` bytes at ``offset`` (fewer at the end of the file). A view keeps the
        mapping alive as long as the transport holds it, after the file is closed."""
        if self._mapping is not None and _cached(self.fd, offset, length):
            return memoryview(self._mapping)[offset : offset + length]
        return await asyncio.to_thread(os.pread, self.fd, length, offset)

    def sent(self, offset: int, length: int) -> None:
        """The range (``offset`` a multiple of the page size) is sent: drop its pages from
        the mapping, or the process's resident memory would grow by the whole file (1
        GiB streamed: 15 MiB at most with this, 1 GiB without). The page cache keeps
        the pages; a view still in use maps them again."""
        if self._mapping is not None:
            self._mapping.madvise(mmap.MADV_DONTNEED, offset, length)


def _map(fd: int) -> mmap.mmap | None:
    """The whole file, mapped read-only; ``None`` where cached chunks cannot be told
    apart (no ``RWF_NOWAIT``), for an empty file, and where the file system cannot map
    files (every chunk is then read)."""
    size = os.fstat(fd).st_size
    if not size or _NOWAIT is None:
        return None
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except OSError:
        return None


def _cached(fd: int, offset: int, length: int) -> bool:
    """Whether the range's first and last bytes are in the page cache. The kernel reads
    ahead and evicts in runs of pages, so in practice the whole range then is."""
    if _NOWAIT is None:
        return False
    probe = bytearray(1)
    try:
        return all(os.preadv(fd, [probe], at, _NOWAIT) == 1 for at in (offset, offset + length - 1))
    except OSError:  # BlockingIOError: not cached; or a file system without RWF_NOWAIT
        return False
