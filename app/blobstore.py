"""One safetensors file per job under the data directory, written atomically.

Paths come only from job ids that the server generated (validated here), never
from user input.

Each run of a job (an attempt: a job re-queued after its worker was lost runs again)
writes its own file, ``<id>.safetensors`` for the first and ``<id>.<n>.safetensors``
for attempt n, and the record names the attempt whose result counts. A run presumed
lost that resumes and finishes later so never overwrites, nor deletes, the result of the
run that replaced it.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from app.keys import is_job_id

FORMAT = "lens-server/1"

WRITE_CHUNK_BYTES = 1 << 20
"""Bytes per ``write``: one large write into a new file was several times slower than the
same bytes in 1 MiB writes (docs/performance.md), which is why results are not written
with ``safetensors.save_file``."""


_CODES = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}
"""The dtypes a result may hold: safetensors' code and the item size of each."""


@dataclass(frozen=True)
class BlobTensor:
    """A tensor as the file stores it: dtype (``float32``, ``bfloat16``, ...), shape, and
    its bytes in C order, little-endian."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    def __post_init__(self) -> None:
        if self.dtype not in _CODES:
            raise ValueError(f"a result cannot hold {self.dtype} tensors")
        expected = math.prod(self.shape) * self.itemsize
        if self.data.nbytes != expected:
            raise ValueError(f"{self.data.nbytes} bytes for a {self.dtype} {self.shape} tensor")

    @property
    def itemsize(self) -> int:
        return _CODES[self.dtype][1]


class BlobStore:
    """Result blobs in ``root``; shareable across hosts through any common mount."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, job_id: str, attempt: int = 0) -> Path:
        """The result file of the job's ``attempt``."""
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
            raise ValueError(f"not an attempt: {attempt!r}")
        suffix = f".{attempt}" if attempt else ""
        return self.root / job_id[:2] / f"{job_id}{suffix}.safetensors"

    def exists(self, job_id: str, attempt: int = 0) -> bool:
        return self.path(job_id, attempt).is_file()

    def write(
        self,
        job_id: str,
        tensors: Mapping[str, BlobTensor],
        metadata: Mapping[str, str],
        attempt: int = 0,
    ) -> Path:
        """Write the result file of the job's ``attempt``: to a temporary file beside the
        final one, then renamed, so a reader sees the whole file or none."""
        final = self.path(job_id, attempt)
        final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkstemp's file is 0600, and stays so once renamed: results are their key's alone.
        fd, temp = tempfile.mkstemp(prefix=f".{job_id}.", suffix=".tmp", dir=final.parent)
        try:
            with open(fd, "wb") as f:
                _write_safetensors(f, tensors, metadata)
            os.replace(temp, final)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return final

    def delete(self, job_id: str, attempt: int = 0) -> None:
        self.path(job_id, attempt).unlink(missing_ok=True)


def job_of(name: str) -> str:
    """The job id of a result file's name (``<id>.safetensors``, ``<id>.<n>.safetensors``)."""
    return name.split(".", 1)[0]


def blob_metadata(
    *, job_id: str, kind: str, model: str, params: dict[str, Any], summary: dict[str, Any]
) -> dict[str, str]:
    """The self-describing metadata of every result file (strings only, as safetensors wants)."""
    return {
        "format": FORMAT,
        "job_id": job_id,
        "kind": kind,
        "model": model,
        "params": json.dumps(params),
        "summary": json.dumps(summary),
    }


def _write_safetensors(
    f: BinaryIO, tensors: Mapping[str, BlobTensor], metadata: Mapping[str, str]
) -> None:
    """The safetensors layout: the header's length (u64, little-endian), the JSON header
    padded with spaces to 8 bytes, then the tensors' bytes. Wider types come first, so
    every tensor starts at a multiple of its item size and readers can map it in place."""
    order = sorted(tensors, key=lambda name: -tensors[name].itemsize)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        end = offset + tensor.data.nbytes
        header[name] = {
            "dtype": _CODES[tensor.dtype][0],
            "shape": list(tensor.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    f.write(struct.pack("<Q", len(encoded)) + encoded)
    for name in order:
        data = tensors[name].data.cast("B")
        for start in range(0, len(data), WRITE_CHUNK_BYTES):
            f.write(data[start : start + WRITE_CHUNK_BYTES])
