"""Models resident in a worker process: loaded once, reused by every job."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from app.core.config import ModelSpec
from workers.lens.loading import LoadedModel, load_model

log = logging.getLogger(__name__)


@dataclass
class ModelRegistry:
    """The models one worker serves; ``get`` loads on first use and keeps them resident."""

    specs: dict[str, ModelSpec]
    loaded: dict[str, LoadedModel] = field(default_factory=dict)
    load_counts: Counter[str] = field(default_factory=Counter)
    load_seconds: dict[str, float] = field(default_factory=dict)

    def get(self, name: str) -> LoadedModel:
        lm = self.loaded.get(name)
        if lm is None:
            spec = self.specs[name]
            started = time.perf_counter()
            lm = load_model(
                spec.source,
                device=spec.device,
                dtype=spec.dtype,
                trust_remote_code=spec.trust_remote_code,
            )
            self.load_seconds[name] = time.perf_counter() - started
            self.load_counts[name] += 1
            self.loaded[name] = lm
            log.info(
                "loaded model %s from %s in %.2f s", name, spec.source, self.load_seconds[name]
            )
        return lm


def describe(name: str, lm: LoadedModel) -> dict[str, Any]:
    """What GET /v1/models reports about a loaded model (ModelInfo's fields)."""
    return {
        **lm.adapter.describe(),
        "name": name,
        "source": lm.source,
        "max_context": lm.max_context,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(lm.device),
    }
