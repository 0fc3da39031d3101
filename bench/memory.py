"""Peak memory of one call: this process's resident set (Linux) and, on CUDA, the allocator's.

``python -m bench.memory DIR`` measures a trace of every site at every layer of the
model in DIR for one text (128 tokens by default) in a fresh process, the measure
``docs/performance.md`` reports for the logit lens::

    python -m bench.memory ~/.cache/lens-bench/shapes/llama-3.2-1b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Peak:
    """What one call took: seconds, resident memory before it and at its peak, and on CUDA
    the allocator's peak above what was allocated before (bytes)."""

    seconds: float
    rss_before: int
    rss_peak: int
    cuda_peak_above: int | None = None

    @property
    def rss_above(self) -> int:
        return self.rss_peak - self.rss_before


def status_bytes(pid: int | str, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def reset_peak(pid: int | str) -> None:
    """Make the kernel's peak resident set (VmHWM) of ``pid`` restart from now (Linux ≥ 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def measure(call: Callable[[], T], *, collect: bool = True) -> tuple[T, Peak]:
    """Run ``call`` once and say what it took; its result is kept alive until returned.
    ``collect`` first frees what the garbage collector can, so the baseline is honest."""
    if collect:
        gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    reset_peak("self")
    before = status_bytes("self", "VmRSS")
    began = time.perf_counter()
    out = call()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    peak = status_bytes("self", "VmHWM")
    above = torch.cuda.max_memory_allocated() - allocated if cuda else None
    return out, Peak(seconds, before, peak, above)


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def trace_peak(
    model_dir: str, tokens: int, dtype: str, positions: Any, device: str | None
) -> dict[str, Any]:
    """A trace of every site at every layer for one text of ``tokens`` tokens."""
    from bench.models import texts_of_length
    from workers.lens.loading import load_model
    from workers.lens.tracing import trace

    lm = load_model(model_dir, device=device)
    text = texts_of_length(lm.tokenizer, 1, tokens, seed=3)
    trace(lm, texts_of_length(lm.tokenizer, 1, 8, seed=4), layers=[0])  # warm-up
    result, peak = measure(lambda: trace(lm, text, positions=positions, dtype=dtype))
    return {
        "model": model_dir,
        "tokens": tokens,
        "dtype": dtype,
        "positions": positions,
        "model_dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(lm.device),
        "result_bytes": tensor_bytes(result.tensors),
        **asdict(peak),
        "rss_above": peak.rss_above,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model directory")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", help="the trace's dtype")
    parser.add_argument("--positions", default="all", help="'all', 'last' or e.g. 0,-1")
    parser.add_argument("--device", help="default: CUDA when available")
    args = parser.parse_args()
    positions: Any = args.positions
    if positions not in ("all", "last"):
        positions = [int(p) for p in positions.split(",")]
    print(json.dumps(trace_peak(args.model, args.tokens, args.dtype, positions, args.device)))


if __name__ == "__main__":
    main()
