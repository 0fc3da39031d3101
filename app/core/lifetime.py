"""Child processes that end with their supervisor.

``lens serve`` may itself be killed (``kill -9``, the OOM killer) with no chance to stop
its children. On Linux each child asks the kernel for a signal when the thread that
started it dies (``PR_SET_PDEATHSIG``), set between fork and exec so that no window is
left; a child whose supervisor died before that exits at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.prctl  # type: ignore[no-any-return]


_prctl = _load_prctl()
"""Resolved here, in the parent: the child between fork and exec only calls it."""


def die_with_parent(
    sig: signal.Signals = signal.SIGTERM, *, umask: int | None = None
) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when its parent dies, in a session of its
    own (Ctrl-C at the terminal reaches only the supervisor), with ``umask`` if given."""
    parent = os.getpid()

    def preexec() -> None:
        os.setsid()
        if umask is not None:
            os.umask(umask)
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, int(sig))
            if os.getppid() != parent:
                os._exit(1)

    return preexec
