"""Causal Head Gating (Nam et al., NeurIPS 2025, arXiv 2505.13737).

One gate per (layer, head), stored as a logit and passed through a sigmoid, scales that
head's input to W_O. Gates are fitted on the frozen model by minimising, per gate set,

    mean target NLL − λ · mean(clamp(gate logits, −4, 4))

with Adam, each gate set's gradient norm clipped to 1.0 (per set, so the ``num_masks``
sets are independent fits), optional gradient accumulation and linear LR decay. NLL is
the mean over examples of each example's mean next-token NLL on its target tokens.

Stage ``none`` (λ = 0) starts from gates drawn uniformly in (0, 1). Stages ``positive``
(λ = +l1_weight: pressure to keep heads, G+) and ``negative`` (λ = −l1_weight: pressure to
remove heads, G−) both start from its result; being independent, they run together as one
batch of 2 × num_masks gate sets on the same mini-batches. ``workers.lens.taxonomy`` turns
G+ and G− into the paper's scores and roles.

Progress: stage ``none`` then stage ``positive+negative``, one report per update (step is
1-based), with the mean NLL over the stage's gate sets as the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.lens.data import TargetBatch, encode_prompt_targets
from workers.lens.errors import InvalidParameter
from workers.lens.gate_fit import (
    LaggedProgress,
    check_counts,
    clamped_logit_mean,
    clip_per_set,
    linear_lr,
    make_generator,
    plan_batches,
    score_targets,
    uniform_gate_logits,
)
from workers.lens.loading import LoadedModel
from workers.lens.results import AnalysisResult, ProgressCallback, no_progress
from workers.lens.taxonomy import HeadRole, consensus_roles, mask_role_counts, role_scores

JOINT_STAGE = "positive+negative"
_SCORE_NAMES = {
    HeadRole.FACILITATING: "facilitation",
    HeadRole.INTERFERING: "interference",
    HeadRole.IRRELEVANT: "irrelevance",
}


@dataclass(frozen=True)
class FitSettings:
    """What every stage of one fit shares."""

    batch_size: int
    lr: float
    lr_end: float | None
    gradient_accum_steps: int
    record_history: bool


@dataclass(frozen=True)
class StageRun:
    """Final gate logits [sets, layers, heads], per-update NLL [updates, sets], and the
    gates after every update [updates, sets, layers, heads] when recorded."""

    logits: torch.Tensor
    nll: torch.Tensor
    history: torch.Tensor | None


def fit_chg(
    lm: LoadedModel,
    prompts: list[str],
    targets: list[str],
    *,
    num_masks: int = 10,
    num_updates: int = 500,
    num_reg_updates: int = 500,
    batch_size: int = 32,
    l1_weight: float = 0.1,
    lr: float = 1.0,
    lr_end: float | None = None,
    gradient_accum_steps: int = 1,
    seed: int | None = None,
    threshold: float = 0.5,
    max_length: int | None = None,
    record_history: bool = False,
    progress: ProgressCallback = no_progress,
) -> AnalysisResult:
    """Fit ``num_masks`` gate sets in the three CHG stages and classify every head."""
    check_counts(
        num_masks=(num_masks, 1),
        num_updates=(num_updates, 1),
        num_reg_updates=(num_reg_updates, 0),
        batch_size=(batch_size, 1),
        gradient_accum_steps=(gradient_accum_steps, 1),
    )
    _check_rates(l1_weight, lr, lr_end, threshold)
    data = encode_prompt_targets(
        lm.tokenizer, prompts, targets, lm.device, max_length=max_length, max_context=lm.max_context
    )
    generator = make_generator(seed)
    settings = FitSettings(batch_size, lr, lr_end, gradient_accum_steps, record_history)
    init = uniform_gate_logits(num_masks, lm, generator)
    none = _fit_stage(
        lm, data, init, torch.zeros(num_masks), num_updates, "none", settings, generator, progress
    )
    if num_reg_updates:
        weights = torch.cat(
            [torch.full((num_masks,), l1_weight), torch.full((num_masks,), -l1_weight)]
        )
        start = torch.cat([none.logits, none.logits])
        joint = _fit_stage(
            lm, data, start, weights, num_reg_updates, JOINT_STAGE, settings, generator, progress
        )
        positive, negative = _split(joint, num_masks)
    else:
        positive = negative = StageRun(
            logits=none.logits,
            nll=none.nll[:0],
            history=None if none.history is None else none.history[:0],
        )
    return _result({"none": none, "positive": positive, "negative": negative}, threshold, generator)


def _check_rates(l1_weight: float, lr: float, lr_end: float | None, threshold: float) -> None:
    if l1_weight < 0:
        raise InvalidParameter(
            "l1_weight", f"must be ≥ 0 (its sign is set per stage), got {l1_weight}"
        )
    if lr <= 0:
        raise InvalidParameter("lr", f"must be > 0, got {lr}")
    if lr_end is not None and lr_end <= 0:
        raise InvalidParameter("lr_end", f"must be > 0, got {lr_end}")
    if not 0 <= threshold <= 1:
        raise InvalidParameter("threshold", f"must lie in [0, 1], got {threshold}")


def _fit_stage(
    lm: LoadedModel,
    data: TargetBatch,
    init: torch.Tensor,
    weights: torch.Tensor,
    updates: int,
    stage: str,
    settings: FitSettings,
    generator: torch.Generator,
    progress: ProgressCallback,
) -> StageRun:
    """Fit gate sets from ``init`` logits, set ``s`` with regulariser weight ``weights[s]``."""
    device = lm.device
    logits = init.to(device).requires_grad_(True)
    weights = weights.to(device)
    optimizer = torch.optim.Adam([logits], lr=settings.lr)
    accum = settings.gradient_accum_steps
    plan = plan_batches(len(data), settings.batch_size, updates * accum, generator, device)
    nll = torch.zeros(updates, init.shape[0], device=device)
    history = torch.empty(updates, *init.shape, device=device) if settings.record_history else None
    reporter = LaggedProgress(progress, stage, updates, device)
    for update in range(updates):
        for group in optimizer.param_groups:
            group["lr"] = linear_lr(settings.lr, settings.lr_end, update, updates)
        for micro in range(accum):
            scores = score_targets(lm, plan.batch(data, update * accum + micro), logits.sigmoid())
            batch_nll = -scores.logprob.mean(dim=1)
            loss = (batch_nll - weights * clamped_logit_mean(logits)).sum() / accum
            loss.backward()
            nll[update] += batch_nll.detach() / accum
        assert logits.grad is not None
        clip_per_set(logits.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if history is not None:
            history[update] = logits.detach().sigmoid()
        reporter.update(update + 1, nll[update].mean())
    reporter.finish()
    return StageRun(logits=logits.detach(), nll=nll, history=history)


def _split(joint: StageRun, num_masks: int) -> tuple[StageRun, StageRun]:
    def part(sets: slice) -> StageRun:
        history = None if joint.history is None else joint.history[:, sets]
        return StageRun(logits=joint.logits[sets], nll=joint.nll[:, sets], history=history)

    return part(slice(0, num_masks)), part(slice(num_masks, None))


def _result(
    runs: dict[str, StageRun], threshold: float, generator: torch.Generator
) -> AnalysisResult:
    masks = {stage: run.logits.sigmoid().float().cpu() for stage, run in runs.items()}
    g_plus, g_minus = masks["positive"], masks["negative"]
    nll = {stage: run.nll.mean(dim=1).float().cpu() for stage, run in runs.items()}
    roles = consensus_roles(g_plus, g_minus, threshold)
    tensors = {f"masks.{stage}": m.contiguous() for stage, m in masks.items()}
    tensors |= {f"nll.{stage}": v for stage, v in nll.items()}
    tensors |= {
        f"scores.{_SCORE_NAMES[role]}": s.contiguous()
        for role, s in role_scores(g_plus, g_minus).items()
    }
    tensors["taxonomy"] = roles
    for stage, run in runs.items():
        if run.history is not None:
            tensors[f"history.{stage}"] = run.history.float().cpu().contiguous()
    counts = mask_role_counts(g_plus, g_minus, threshold)
    codes = roles.tolist()
    summary = {
        "num_masks": g_plus.shape[0],
        "layers": g_plus.shape[1],
        "heads": g_plus.shape[2],
        "threshold": threshold,
        "seed": generator.initial_seed(),
        "role_codes": {role.label: int(role) for role in HeadRole},
        "roles": [[HeadRole(c).label for c in row] for row in codes],
        "role_counts": {role.label: int((roles == role).sum()) for role in HeadRole},
        "facilitating_heads": (roles == HeadRole.FACILITATING).nonzero().tolist(),
        "mask_counts": {role.label: c.tolist() for role, c in counts.items()},
        "final_nll": {stage: float(v[-1]) if len(v) else None for stage, v in nll.items()},
    }
    return AnalysisResult(tensors=tensors, summary=summary)
