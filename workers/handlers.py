"""Job handlers: typed parameters in, analysis core call, AnalysisResult out. Thin on purpose."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.schemas import JobKind, ScoreJob, TraceJob, as_list
from workers.context import JobContext
from workers.lens import scoring, tracing
from workers.lens.results import AnalysisResult

Handler = Callable[[JobContext, Any], AnalysisResult]


def run_score(ctx: JobContext, job: ScoreJob) -> AnalysisResult:
    return scoring.score(
        ctx.lm,
        as_list(job.texts),
        temperature=job.temperature,
        final_token_only=job.final_token_only,
        top_k=job.top_k,
    )


def run_trace(ctx: JobContext, job: TraceJob) -> AnalysisResult:
    return tracing.trace(
        ctx.lm,
        as_list(job.texts),
        layers=job.layers,
        sites=job.sites,
        positions=job.positions,
        dtype=job.dtype.value,
    )


HANDLERS: dict[JobKind, Handler] = {
    JobKind.SCORE: run_score,
    JobKind.TRACE: run_trace,
}
