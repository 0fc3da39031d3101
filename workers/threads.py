"""Each worker's share of the host's cores, given to torch before the worker does any work.

torch sizes its thread pools to every core of the host. Two workers on one host then run
twice as many OpenMP threads as there are cores, which wait for each other at every
operation and starve the API and Redis: a burst of small jobs ran slower on two workers
than on one (``python -m bench --soak``). So each worker takes ``worker_threads``
threads, by default the host's cores ÷ the workers on it (``local_workers``, which
``lens serve`` sets), at least one. A worker whose models all live on GPUs needs few:
its CPU work is the Python around the kernels, tokenisation and copies, so it takes at
most ``GPU_WORKER_THREADS``. (``lens worker`` also makes those threads sleep rather than
spin between operations: ``OMP_WAIT_POLICY``, which must be set before torch loads.)
"""

from __future__ import annotations

import logging
import os

import torch

from app.core.config import ModelSpec, Settings

log = logging.getLogger(__name__)

GPU_WORKER_THREADS = 2


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_budget(settings: Settings, models: list[str], cores: int | None = None) -> int:
    """``worker_threads`` if set; else this worker's share of the host's ``cores``."""
    if settings.worker_threads is not None:
        return settings.worker_threads
    share = max(1, (cores or host_cores()) // settings.local_workers)
    if torch.cuda.is_available() and all(on_gpus(settings.models[m]) for m in models):
        return min(GPU_WORKER_THREADS, share)
    return share


def on_gpus(spec: ModelSpec) -> bool:
    """Whether the model's weights go to GPUs (its default device is CUDA when present)."""
    if isinstance(spec.device_map, dict):
        return all(
            isinstance(d, int) or str(d).startswith("cuda") for d in spec.device_map.values()
        )
    if spec.device_map is not None:
        return True
    return spec.device is None or spec.device.startswith("cuda")


def apply_thread_budget(threads: int) -> None:
    """Give torch ``threads`` intra-op and as many inter-op threads. The inter-op pool can
    be sized once per process, before any parallel work: a process that already ran some
    (a test running a worker in-process) keeps the one it has."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        log.info("inter-op threads already fixed at %d", torch.get_num_interop_threads())
