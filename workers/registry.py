"""Models resident in a worker process: loaded on first use, kept for the next jobs.

A worker may serve more models than fit in its memory. The registry keeps the most
recently used ones within a budget (bytes of parameters and buffers, and/or a number
of models) and evicts the least recently used first. Before a load it makes room for
the model's expected size (its measured size if it was resident before, else what its
safetensors headers announce, in the dtype it loads in); after the load, for its
measured size. The model a job has
just asked for is never evicted for its own sake, so one model larger than the budget
still loads, alone.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from app.core.config import ModelSpec
from workers.lens.loading import LoadedModel, load_model, pick_device, pick_dtype

log = logging.getLogger(__name__)


@dataclass
class ModelRegistry:
    """The models one worker serves; ``get`` loads on a miss and evicts beyond the budget.

    ``max_bytes`` and ``max_models`` are the budget (``None``: unbounded).
    """

    specs: dict[str, ModelSpec]
    max_bytes: int | None = None
    max_models: int | None = None
    offload_dir: Path | None = None
    """Where modules a ``device_map`` sends to ``"disk"`` are kept (one folder per model)."""
    loaded: OrderedDict[str, LoadedModel] = field(default_factory=OrderedDict)
    sizes: dict[str, int] = field(default_factory=dict)
    load_counts: Counter[str] = field(default_factory=Counter)
    load_seconds: dict[str, float] = field(default_factory=dict)
    evictions: Counter[str] = field(default_factory=Counter)
    hits: int = 0
    misses: int = 0

    def __post_init__(self) -> None:
        for name, value in (("max_bytes", self.max_bytes), ("max_models", self.max_models)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None for no limit), got {value}")

    def get(self, name: str) -> LoadedModel:
        """The resident model ``name``, loading it (and evicting others) if it is not."""
        lm = self.loaded.get(name)
        if lm is not None:
            self.hits += 1
            self.loaded.move_to_end(name)
            return lm
        self.misses += 1
        spec = self.specs[name]
        self._make_room(self.sizes.get(name) or _checkpoint_bytes(spec))
        started = time.perf_counter()
        lm = load_model(
            spec.source,
            device=spec.device,
            dtype=spec.dtype,
            device_map=spec.device_map,
            offload_dir=self.offload_dir / name if self.offload_dir else None,
            trust_remote_code=spec.trust_remote_code,
        )
        self.load_seconds[name] = time.perf_counter() - started
        self.load_counts[name] += 1
        self.sizes[name] = model_bytes(lm)
        self._make_room(self.sizes[name])
        self.loaded[name] = lm
        log.info(
            "loaded model %s from %s in %.2f s (%.1f MB)",
            name,
            spec.source,
            self.load_seconds[name],
            self.sizes[name] / 1e6,
        )
        return lm

    def resident_bytes(self) -> int:
        return sum(self.sizes[name] for name in self.loaded)

    def _make_room(self, incoming: int) -> None:
        """Evict least recently used models until one more of ``incoming`` bytes fits."""
        freed = False
        while self.loaded and (
            (self.max_models is not None and len(self.loaded) + 1 > self.max_models)
            or (self.max_bytes is not None and self.resident_bytes() + incoming > self.max_bytes)
        ):
            name, _ = self.loaded.popitem(last=False)
            self.evictions[name] += 1
            freed = True
            log.info("evicted model %s (least recently used)", name)
        if freed:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def stats(self) -> dict[str, Any]:
        """JSON-able figures for the worker's heartbeat (and so the API's /metrics)."""
        lookups = self.hits + self.misses
        out: dict[str, Any] = {
            "resident": list(self.loaded),
            "resident_bytes": self.resident_bytes(),
            "max_bytes": self.max_bytes,
            "max_models": self.max_models,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / lookups if lookups else None,
            "loads": dict(self.load_counts),
            "load_seconds": dict(self.load_seconds),
            "evictions": dict(self.evictions),
            "model_bytes": dict(self.sizes),
        }
        if torch.cuda.is_available():
            out["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        return out


def model_bytes(lm: LoadedModel) -> int:
    """Bytes of the model's parameters and buffers (tied weights counted once)."""
    tensors = [*lm.model.parameters(), *lm.model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _checkpoint_bytes(spec: ModelSpec) -> int:
    """Expected bytes of a local checkpoint once loaded: its tensors' elements times the
    element size of the dtype it loads in (read from the safetensors headers only);
    0 for a hub id, whose size is known only once loaded."""
    path = Path(spec.source)
    if not path.is_dir():
        return 0
    dtype = pick_dtype(pick_device(spec.device), spec.dtype)
    elements = 0
    for file in path.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            elements += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - safe_open is no dict
    return elements * torch.empty((), dtype=dtype).element_size()


def describe(name: str, lm: LoadedModel) -> dict[str, Any]:
    """What GET /v1/models reports about a loaded model (ModelInfo's fields): with the
    MLP's width, the model's bytes and its device's memory, what the API sizes jobs by."""
    return {
        **lm.adapter.describe(),
        "name": name,
        "source": lm.source,
        "max_context": lm.max_context,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": ", ".join(lm.placement) if lm.spread else str(lm.device),
        "intermediate_size": intermediate_size(lm),
        "model_bytes": model_bytes(lm),
        "device_memory_bytes": device_memory(lm.device),
    }


_MLP_WIDTHS = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")


def intermediate_size(lm: LoadedModel) -> int | None:
    """The MLP's hidden width from the config (a sparse MoE: one expert's), if it says."""
    config = lm.model.config.get_text_config()
    for name in _MLP_WIDTHS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def device_memory(device: torch.device) -> int | None:
    """A GPU's memory, or the host's for the CPU (Linux); None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError):
            return None
    return None
