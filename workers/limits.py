"""Operator limits a worker enforces (it has the tokenizer and the tensors), and memory:
capping a worker's memory, recognising out-of-memory failures and explaining them.

On CUDA, running out of the GPU's memory (or of ``cuda_memory_fraction`` of it)
raises ``torch.OutOfMemoryError``. On the CPU the kernel's OOM killer would end the
whole worker, so ``worker_memory_mb`` caps the worker's address space instead
(RLIMIT_AS, set after its models are loaded): an allocation beyond it fails inside
the job, which then fails as out of memory while the worker lives on.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterable
from pathlib import Path
from weakref import WeakKeyDictionary

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from app.core import jobsize
from app.core.config import Limits, Settings
from app.core.jobsize import describe_size
from app.schemas import JobRequest, ModelInfo
from workers.lens.errors import InvalidParameter, LensError
from workers.lens.loading import LoadedModel
from workers.registry import describe

log = logging.getLogger(__name__)

_CPU_OOM_MARKERS = ("can't allocate memory", "cannot allocate memory", "out of memory")


class LimitExceeded(LensError):
    """A job is within the API's limits but its result would exceed the operator's."""


def check_job(
    job: JobRequest,
    lm: LoadedModel,
    limits: Limits,
    dataset_dir: Path,
    counted: dict[str, list[int]] | None = None,
) -> None:
    """Everything a worker checks before it computes anything: the token limits
    (:func:`check_tokens`), then the result's size and the peak memory, estimated from
    the real token counts (as the API did, from the same counts where this worker published
    its tokenizer, else from guessed ones). Raises InvalidParameter or LimitExceeded."""
    tokens = check_tokens(job, lm.tokenizer, limits, dataset_dir, counted)
    shape = model_shape(lm)
    if shape is None:
        return
    try:
        jobsize.check_cost(job, shape, tokens, limits, guessed=False)
    except jobsize.JobTooLarge as exc:
        raise LimitExceeded(str(exc)) from None


_SHAPES: WeakKeyDictionary[nn.Module, jobsize.ModelShape | None] = WeakKeyDictionary()


def model_shape(lm: LoadedModel) -> jobsize.ModelShape | None:
    """The shape the API sizes jobs by (what the worker published), once per model."""
    if lm.model not in _SHAPES:
        _SHAPES[lm.model] = jobsize.ModelShape.of(ModelInfo.model_validate(describe("", lm)))
    return _SHAPES[lm.model]


def check_tokens(
    job: JobRequest,
    tokenizer: PreTrainedTokenizerBase,
    limits: Limits,
    dataset_dir: Path,
    counted: dict[str, list[int]] | None = None,
) -> dict[str, list[int]]:
    """Tokens per text and per job, each text tokenised on its own as the model sees it
    (special tokens included), data sets too (:func:`app.core.jobsize.count_tokens`, as
    the API counts them where this worker published its tokenizer). ``counted`` gives
    the token counts of fields already tokenised (a batch's lengths). Returns the counts
    by field; raises InvalidParameter, as soon as a chunk of texts shows the job is over
    a limit."""
    try:
        return jobsize.count_tokens(job, encoder(tokenizer), limits, dataset_dir, counted)
    except jobsize.TokenLimitExceeded as exc:
        raise InvalidParameter(exc.field, str(exc)) from None


def encoder(tokenizer: PreTrainedTokenizerBase) -> jobsize.Encode:
    """How the worker counts each text's tokens (special tokens included)."""

    def encode(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]

    return encode


def check_result_size(tensors: dict[str, torch.Tensor], limits: Limits) -> None:
    """Refuse to write a result over ``max_result_bytes``, before anything is written."""
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size > limits.max_result_bytes:
        raise LimitExceeded(
            f"the result would hold {size} bytes of tensors, over the limit max_result_bytes = "
            f"{limits.max_result_bytes}; ask for less (fewer layers, sites or texts, "
            "positions='last', top_k, dtype='float16')"
        )


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, Python's MemoryError, or torch's CPU allocator failing (a RuntimeError)."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _CPU_OOM_MARKERS)


def out_of_memory_message(kind: str, params: dict[str, object], exc: BaseException) -> str:
    """Names the job's size, so its owner knows what to shrink."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"out of memory running {describe_size(kind, params)}; the worker freed the memory "
        f"and goes on with other jobs: resubmit with fewer texts or a smaller batch_size or "
        f"num_masks ({first_line})"
    )


def address_space() -> int:
    """This process's virtual memory size in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def apply_memory_limits(settings: Settings, models: Iterable[LoadedModel]) -> None:
    """Cap this worker's memory as the operator set it, once its models are loaded."""
    devices = {lm.device for lm in models}
    if settings.cuda_memory_fraction is not None:
        for device in devices:
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(settings.cuda_memory_fraction, device)
    if settings.worker_memory_mb is None:
        return
    if any(d.type == "cuda" for d in devices):
        log.warning(
            "worker_memory_mb ignored: an address-space limit breaks CUDA, which reserves "
            "large ranges; use cuda_memory_fraction on GPU workers"
        )
        return
    cap = address_space() + settings.worker_memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
    log.info("memory capped: %d MB beyond the loaded models", settings.worker_memory_mb)
