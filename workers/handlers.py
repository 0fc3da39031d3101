"""Job handlers: typed parameters in, analysis core call, AnalysisResult out. Thin on purpose."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from safetensors import SafetensorError

from app.kinds import KINDS, JobKind, handler_path
from app.schemas import (
    AblateJob,
    AttributeJob,
    CchgJob,
    ChgJob,
    KeepRule,
    ScoreJob,
    TraceJob,
    as_list,
)
from workers.context import JobContext
from workers.lens import ablation, attribution, cchg, chg, gradients, scoring, tracing
from workers.lens.prompt_targets import generate_pattern
from workers.lens.results import AnalysisResult
from workers.lens.taxonomy import heads_to_keep

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
    texts = as_list(job.texts)
    result = tracing.trace(
        ctx.lm,
        texts,
        layers=job.layers,
        sites=job.sites,
        positions=job.positions,
        dtype=job.dtype.value,
    )
    if job.gradients is not None:
        grads = gradients.trace_gradients(
            ctx.lm,
            texts,
            layers=job.layers,
            sites=job.sites,
            target=job.gradients.target,
            target_ids=job.gradients.target_ids,
            position=job.gradients.position,
            positions=job.positions,
            dtype=job.dtype.value,
        )
        result.tensors.update(grads)
    return result


def _prompts_targets(ctx: JobContext, job: ChgJob | AblateJob) -> tuple[list[str], list[str]]:
    if job.dataset is not None:
        return ctx.dataset("dataset", job.dataset)
    if isinstance(job, ChgJob) and job.pattern is not None:
        return generate_pattern(ctx.lm.tokenizer, job.pattern, job.num_samples, job.seed)
    return list(job.texts or []), list(job.targets or [])


def _head_mask(
    ctx: JobContext,
    field: str,
    mask: list[list[float]] | None,
    from_job: str | None,
    keep: KeepRule | None,
    threshold: float,
    consensus: float,
) -> torch.Tensor:
    if mask is not None:
        return torch.tensor(mask, dtype=torch.float32)
    if from_job is None or keep is None:
        raise ValueError(f"{field}: needs a mask or from_job with keep")  # the schema ensures it
    gates = ("masks.positive", "masks.negative")
    try:
        masks = ctx.job_tensors("from_job", from_job, (*gates, "gate_signal"))
    except SafetensorError:  # a result written before chg stored its gate signal
        masks = ctx.job_tensors("from_job", from_job, gates)
    return heads_to_keep(
        masks["masks.positive"],
        masks["masks.negative"],
        keep.value,
        threshold,
        masks.get("gate_signal"),
        consensus,
    )


def run_chg(ctx: JobContext, job: ChgJob) -> AnalysisResult:
    prompts, targets = _prompts_targets(ctx, job)
    return chg.fit_chg(
        ctx.lm,
        prompts,
        targets,
        num_masks=job.num_masks,
        num_updates=job.num_updates,
        num_reg_updates=job.num_reg_updates,
        batch_size=job.batch_size,
        l1_weight=job.l1_weight,
        lr=job.lr,
        lr_end=job.lr_end,
        gradient_accum_steps=job.gradient_accum_steps,
        seed=job.seed,
        threshold=job.threshold,
        consensus=job.consensus,
        max_length=job.max_length,
        target_join=job.target_join,
        record_history=job.record_history,
        checkpoint_above=job.checkpoint_above,
        progress=ctx.progress,
    )


def run_ablate(ctx: JobContext, job: AblateJob) -> AnalysisResult:
    prompts, targets = _prompts_targets(ctx, job)
    mask = _head_mask(
        ctx, "head_mask", job.head_mask, job.from_job, job.keep, job.threshold, job.consensus
    )
    return ablation.ablate(
        ctx.lm,
        prompts,
        targets,
        mask,
        max_length=job.max_length,
        target_join=job.target_join,
        progress=ctx.progress,
    )


def run_cchg(ctx: JobContext, job: CchgJob) -> AnalysisResult:
    if job.retain_dataset is not None and job.forget_dataset is not None:
        retain = ctx.dataset("retain_dataset", job.retain_dataset)
        forget = ctx.dataset("forget_dataset", job.forget_dataset)
    else:
        retain = (job.retain_texts or [], job.retain_targets or [])
        forget = (job.forget_texts or [], job.forget_targets or [])
    eval_pairs = None
    if job.eval_retain_texts is not None:
        eval_pairs = cchg.ContrastPairs(
            retain_prompts=job.eval_retain_texts,
            retain_targets=job.eval_retain_targets or [],
            forget_prompts=job.eval_forget_texts or [],
            forget_targets=job.eval_forget_targets or [],
        )
    return cchg.fit_cchg(
        ctx.lm,
        *retain,
        *forget,
        eval_pairs=eval_pairs,
        num_masks=job.num_masks,
        num_updates=job.num_updates,
        batch_size=job.batch_size,
        lr=job.lr,
        lr_end=job.lr_end,
        l1_weight=job.l1_weight,
        diff_clip=job.diff_clip,
        seed=job.seed,
        max_length=job.max_length,
        target_join=job.target_join,
        checkpoint_above=job.checkpoint_above,
        progress=ctx.progress,
    )


def run_attribute(ctx: JobContext, job: AttributeJob) -> AnalysisResult:
    mask = _head_mask(
        ctx,
        "facilitating_mask",
        job.facilitating_mask,
        job.from_job,
        job.keep,
        job.threshold,
        job.consensus,
    )
    return attribution.attribute(
        ctx.lm,
        job.document,
        job.sentences,
        job.summary,
        mask,
        aggregate=job.aggregate,
        target_join=job.target_join,
        normalize=job.normalize,
        loss=job.loss,
    )


def resolve_handler(kind: str) -> Handler:
    """The function :mod:`app.kinds` names as the kind's handler."""
    module, name = handler_path(kind)
    handler: Handler | None = getattr(importlib.import_module(module), name, None)
    if not callable(handler):
        raise LookupError(f"app.kinds: kind {str(kind)!r} names handler {module}.{name}, not found")
    return handler


HANDLERS: dict[JobKind, Handler] = {kind: resolve_handler(kind) for kind in KINDS}
