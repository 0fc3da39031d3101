"""The worker's malloc setting: freed memory is reused without page faults. Each case
runs in a fresh interpreter, as a worker process does (the setting is process-wide)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from workers.malloc import MAX_KEEP_MIB, keep_freed_memory

BLOCK_PAGES = 64 * 256  # a 64 MiB block, in 4 KiB pages

_PROBE = """
import json, resource, sys
from workers.malloc import keep_freed_memory
applied = keep_freed_memory(int(sys.argv[1]))
size = 64 << 20
source = bytes(range(256)) * (size // 256)
block = bytearray(size); block[:] = source; del block  # the first one always faults
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    block = bytearray(size)
    block[:] = source  # every page written
    del block
print(json.dumps({"applied": applied,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}))
"""


def _faults(keep_mib: int) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(keep_mib)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_a_freed_block_is_reused_without_faulting_it_in_again() -> None:
    kept, default = _faults(1024), _faults(0)
    assert kept["applied"] and not default["applied"]
    # glibc's defaults hand the 64 MiB block back on every free: five blocks' pages fault
    assert default["faults"] > 4 * BLOCK_PAGES
    assert kept["faults"] < BLOCK_PAGES // 10


def test_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="keep_mib"):
        keep_freed_memory(MAX_KEEP_MIB + 1)
