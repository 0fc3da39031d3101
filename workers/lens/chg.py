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

Roles: see ``workers.lens.taxonomy`` (per-mask roles from the paper's scores, a consensus
over masks, ``undetermined`` where neither is supported). Whether a gate's position is the
loss's doing is read from the fit itself: each update, the NLL's gradient with respect to
every gate (not its logit, whose gradient vanishes once a gate saturates) is folded into a
moving average over about ten updates, and ``gate_signal`` [masks, layers, heads] is the
largest magnitude that average reached in any stage, divided by the regulariser's
strength: 4λ / (layers × heads), the gradient with respect to a gate at 0.5 that matches
the regulariser's λ / (layers × heads) on its logit. Below 1, the loss never pulled on the
gate as hard as the regulariser can, so wherever the gate ended it got there by noise
(Adam rescales zero-mean gradient noise into full-size steps, and beyond the ±4 clip the
regulariser stops acting); such a head is ``undetermined`` in that mask instead of
facilitating, interfering or inconsistent. The moving average, not the last updates
alone: a head the task needs stops getting gradient once its gate saturates on a model
that predicts the targets confidently.

Progress: stage ``none`` then stage ``positive+negative``, one report per update (step is
1-based), with the mean NLL over the stage's gate sets as the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.lens.checkpointing import DEFAULT_CHECKPOINT_ABOVE
from workers.lens.errors import InvalidParameter
from workers.lens.gate_fit import (
    GateUpdates,
    LaggedProgress,
    check_counts,
    clamped_logit_mean,
    make_generator,
    plan_batches,
    score_targets,
    uniform_gate_logits,
)
from workers.lens.loading import LoadedModel
from workers.lens.prompt_targets import TargetBatch, encode_prompt_targets
from workers.lens.results import AnalysisResult, ProgressCallback, no_progress
from workers.lens.taxonomy import (
    DEFAULT_CONSENSUS,
    HeadRole,
    check_consensus,
    consensus_roles,
    mask_role_counts,
    mask_roles,
    role_scores,
)

JOINT_STAGE = "positive+negative"
SIGNAL_DECAY = 0.9
"""Of the moving average of each gate's loss gradient: about ten updates."""
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
    checkpoint_above: int


@dataclass(frozen=True)
class StageRun:
    """Final gate logits [sets, layers, heads], per-update NLL [updates, sets], the largest
    moving average of each gate's NLL gradient [sets, layers, heads], and the gates after
    every update [updates, sets, layers, heads] when recorded."""

    logits: torch.Tensor
    nll: torch.Tensor
    peak_gradient: torch.Tensor
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
    consensus: float = DEFAULT_CONSENSUS,
    max_length: int | None = None,
    target_join: str = "space",
    record_history: bool = False,
    checkpoint_above: int = DEFAULT_CHECKPOINT_ABOVE,
    progress: ProgressCallback = no_progress,
) -> AnalysisResult:
    """Fit ``num_masks`` gate sets in the three CHG stages and classify every head.

    Batches of examples of ``checkpoint_above`` tokens or more (padded) are fitted with
    gradient checkpointing per block: the same fit in less memory, for one more forward
    pass of each block."""
    check_counts(
        num_masks=(num_masks, 1),
        num_updates=(num_updates, 1),
        num_reg_updates=(num_reg_updates, 0),
        batch_size=(batch_size, 1),
        gradient_accum_steps=(gradient_accum_steps, 1),
        checkpoint_above=(checkpoint_above, 1),
    )
    _check_rates(l1_weight, lr, lr_end, threshold)
    check_consensus(consensus)
    data = encode_prompt_targets(
        lm.tokenizer,
        prompts,
        targets,
        lm.device,
        target_join=target_join,
        max_length=max_length,
        max_context=lm.max_context,
    )
    generator = make_generator(seed)
    settings = FitSettings(
        batch_size, lr, lr_end, gradient_accum_steps, record_history, checkpoint_above
    )
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
            peak_gradient=none.peak_gradient,
            history=None if none.history is None else none.history[:0],
        )
    runs = {"none": none, "positive": positive, "negative": negative}
    signal_floor = 4 * l1_weight / (lm.adapter.num_layers * lm.adapter.num_heads)
    return _result(runs, threshold, consensus, signal_floor, generator)


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
    fit = GateUpdates(
        init.to(device), settings.lr, settings.lr_end, updates, compute_dtype=lm.dtype
    )
    weights = weights.to(device)
    accum = settings.gradient_accum_steps
    plan = plan_batches(len(data), settings.batch_size, updates * accum, generator, device)
    nll = torch.zeros(updates, init.shape[0], device=device)
    average = torch.zeros(init.shape, device=device)
    peak = torch.zeros(init.shape, device=device)
    history = torch.empty(updates, *init.shape, device=device) if settings.record_history else None
    reporter = LaggedProgress(progress, stage, updates, device)
    for update in range(updates):
        gates = fit.gates()
        for micro in range(accum):
            batch = plan.batch(data, update * accum + micro)
            scores = score_targets(lm, batch, gates, settings.checkpoint_above)
            batch_nll = -scores.logprob.mean(dim=1)
            fit.backward(batch_nll.sum() / accum)
            nll[update] += batch_nll.detach() / accum
        gradient = fit.step(update, -(weights * clamped_logit_mean(fit.logits)).sum())
        average.mul_(SIGNAL_DECAY).add_(gradient, alpha=1 - SIGNAL_DECAY)
        torch.maximum(peak, average.abs(), out=peak)
        if history is not None:
            history[update] = fit.logits.detach().sigmoid()
        reporter.update(update + 1, nll[update].mean())
    reporter.finish()
    return StageRun(logits=fit.logits.detach(), nll=nll, peak_gradient=peak, history=history)


def _split(joint: StageRun, num_masks: int) -> tuple[StageRun, StageRun]:
    def part(sets: slice) -> StageRun:
        history = None if joint.history is None else joint.history[:, sets]
        return StageRun(
            logits=joint.logits[sets],
            nll=joint.nll[:, sets],
            peak_gradient=joint.peak_gradient[sets],
            history=history,
        )

    return part(slice(0, num_masks)), part(slice(num_masks, None))


def _result(
    runs: dict[str, StageRun],
    threshold: float,
    consensus: float,
    signal_floor: float,
    generator: torch.Generator,
) -> AnalysisResult:
    masks = {stage: run.logits.sigmoid().float().cpu() for stage, run in runs.items()}
    g_plus, g_minus = masks["positive"], masks["negative"]
    nll = {stage: run.nll.mean(dim=1).float().cpu() for stage, run in runs.items()}
    peak = torch.stack([run.peak_gradient.float().cpu() for run in runs.values()]).amax(dim=0)
    signal = peak / signal_floor if signal_floor > 0 else torch.full_like(peak, torch.inf)
    per_mask = mask_roles(g_plus, g_minus, threshold, signal)
    roles, agreement = consensus_roles(per_mask, consensus)
    tensors = {f"masks.{stage}": m.contiguous() for stage, m in masks.items()}
    tensors |= {f"nll.{stage}": v for stage, v in nll.items()}
    tensors |= {
        f"scores.{_SCORE_NAMES[role]}": s.contiguous()
        for role, s in role_scores(g_plus, g_minus).items()
    }
    tensors |= {
        "taxonomy": roles,
        "taxonomy_agreement": agreement,
        "mask_roles": per_mask,
        "gate_signal": signal.contiguous(),
    }
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
        "consensus": consensus,
        "seed": generator.initial_seed(),
        "role_codes": {role.label: int(role) for role in HeadRole},
        "roles": [[HeadRole(c).label for c in row] for row in codes],
        "role_counts": {role.label: int((roles == role).sum()) for role in HeadRole},
        "facilitating_heads": (roles == HeadRole.FACILITATING).nonzero().tolist(),
        "taxonomy_agreement": [[round(float(a), 4) for a in row] for row in agreement],
        "mask_counts": {role.label: c.tolist() for role, c in counts.items()},
        "without_signal": int((signal < 1).sum()),
        "final_nll": {stage: float(v[-1]) if len(v) else None for stage, v in nll.items()},
    }
    return AnalysisResult(tensors=tensors, summary=summary)
