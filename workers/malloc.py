"""glibc's malloc set for a long-lived worker: memory a job frees is kept for the next.

By default glibc gives large freed blocks back to the kernel (each block over a few MB
is its own ``mmap``, and the top of the heap is trimmed), so the next job of the same
shape faults every page in again, zero-filled by the kernel, and those faults made the
slowest jobs (docs/performance.md, "Freed memory kept for the next job"). A worker runs
jobs of similar shapes over and over; it keeps what it frees, as PyTorch's caching
allocator does on a GPU.
"""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
MAX_KEEP_MIB = (2**31 - 1) >> 20
"""2047: ``mallopt`` takes a C ``int`` of bytes (app.core.config bounds the setting alike)."""


def keep_freed_memory(keep_mib: int) -> bool:
    """Serve every block from the heap (a block of its own ``mmap`` goes back to the
    kernel when freed) and give the heap's free top back only beyond ``keep_mib``.
    Resident memory then stays near the worker's peak. Whether it was applied: only
    under glibc, and not for ``keep_mib`` 0 (glibc's defaults stay)."""
    if not 0 <= keep_mib <= MAX_KEEP_MIB:
        raise ValueError(f"keep_mib must be within 0 and {MAX_KEEP_MIB}, not {keep_mib}")
    if keep_mib == 0 or not _glibc():
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, keep_mib << 20))


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):  # not a glibc system
        return False
