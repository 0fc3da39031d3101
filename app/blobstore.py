"""One safetensors file per job under the data directory, written atomically.

Paths come only from job ids that the server generated (validated here), never
from user input.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
FORMAT = "lens-server/1"


class BlobStore:
    """Result blobs in ``root``; shareable across hosts through any common mount."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / job_id[:2] / f"{job_id}.safetensors"

    def exists(self, job_id: str) -> bool:
        return self.path(job_id).is_file()

    def temp_path(self, job_id: str) -> Path:
        """A fresh temporary file beside the final one, so the rename is atomic."""
        final = self.path(job_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{job_id}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        return Path(name)

    def commit(self, temp: Path, job_id: str) -> Path:
        final = self.path(job_id)
        os.replace(temp, final)
        return final

    def delete(self, job_id: str) -> None:
        self.path(job_id).unlink(missing_ok=True)


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
