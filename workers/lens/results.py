"""What every analysis returns, and how it reports progress."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Progress:
    """One progress report of a long analysis."""

    stage: str
    step: int
    total: int
    loss: float | None = None


ProgressCallback = Callable[[Progress], None]
"""Called by long analyses after each step; it may raise ``Cancelled`` to stop the job."""


def no_progress(_: Progress) -> None:
    """The default progress callback: ignores every report."""


@dataclass
class AnalysisResult:
    """Tensors to store as safetensors, plus a small JSON-able summary."""

    tensors: dict[str, torch.Tensor]
    summary: dict[str, Any] = field(default_factory=dict)
