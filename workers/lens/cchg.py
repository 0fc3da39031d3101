"""Contrastive Causal Head Gating (Nam et al., NeurIPS 2025, §4.4 and appendix).

One gate set keeps the model's performance on a *retain* variant of a task while
destroying it on a paired *forget* variant, which isolates the heads that the forget
variant needs and the retain variant does not. Per update and gate set the objective,
following the authors' code (andrewnam/causal_head_gating, ``ContrastiveCHGTrainer``), is

    retain NLL + mean_i clamp(lp_forget[i] − stopgrad(lp_retain[i]), min=−diff_clip)
               − λ · mean(clamp(gate logits, −4, 4)),      λ = +l1_weight

where lp are per-example mean target-token log-probs of matched pairs. The middle term
drives the forget log-prob down until it sits ``diff_clip`` nats below the retain one,
then stops pushing; λ > 0 keeps every head not worth removing. (The paper's appendix lists
λ = −0.1, which contradicts its own equation and code; we follow the equation and code.)

Gates start uniform in (0, 1); Adam with ``lr`` decaying linearly toward ``lr_end`` over
``num_updates``, each set's gradient norm clipped to 1.0; ``num_masks`` sets in one pass.
Progress: stage ``contrastive``, one report per update with the objective (mean over sets)
as the loss, then stage ``evaluate``.

Summary: on the evaluation pairs (or the training pairs when none are given), retain and
forget figures under three conditions: all heads on (``all_heads``); each set's gates
binarised at 0.5 (``gated``, one entry per mask, and ``gated_mean``), a circuit one can
name head by head; and each set's continuous gates (``continuous`` and
``continuous_mean``), the authors' evaluation (their notebook applies the fitted sigmoid
gates as they are). Figures per side: ``accuracy`` (an example counts when every target
token is right), ``token_accuracy`` (the share of target tokens right, averaged over
examples: the authors' measure) and ``logprob`` (mean target-token log-prob).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.lens.checkpointing import DEFAULT_CHECKPOINT_ABOVE
from workers.lens.errors import InvalidParameter
from workers.lens.gate_fit import (
    GateUpdates,
    LaggedProgress,
    TargetScores,
    check_counts,
    clamped_logit_mean,
    evaluate_gates,
    make_generator,
    plan_batches,
    score_targets,
    uniform_gate_logits,
)
from workers.lens.loading import LoadedModel
from workers.lens.prompt_targets import TargetBatch, encode_prompt_targets
from workers.lens.results import AnalysisResult, ProgressCallback, no_progress

STAGE = "contrastive"
EVAL_STAGE = "evaluate"
BINARY_THRESHOLD = 0.5
_EVAL_BATCH = 32


@dataclass(frozen=True)
class ContrastPairs:
    """Matched (retain, forget) prompt/target pairs: item ``i`` of each list goes together."""

    retain_prompts: list[str]
    retain_targets: list[str]
    forget_prompts: list[str]
    forget_targets: list[str]

    def encode(
        self, lm: LoadedModel, max_length: int | None, prefix: str, target_join: str = "space"
    ) -> tuple[TargetBatch, TargetBatch]:
        """Tokenise both sides; errors name ``<prefix>retain_texts`` and the like."""
        n = len(self.retain_prompts)
        sizes = {
            f"{prefix}retain_targets": len(self.retain_targets),
            f"{prefix}forget_texts": len(self.forget_prompts),
            f"{prefix}forget_targets": len(self.forget_targets),
        }
        for field, size in sizes.items():
            if size != n:
                raise InvalidParameter(
                    field,
                    f"has {size} items but {prefix}retain_texts has {n}; pairs match by position",
                )
        sides = []
        for side, prompts, targets in (
            ("retain_", self.retain_prompts, self.retain_targets),
            ("forget_", self.forget_prompts, self.forget_targets),
        ):
            sides.append(
                encode_prompt_targets(
                    lm.tokenizer,
                    prompts,
                    targets,
                    lm.device,
                    target_join=target_join,
                    max_length=max_length,
                    max_context=lm.max_context,
                    field_prefix=prefix + side,
                )
            )
        return sides[0], sides[1]


def fit_cchg(
    lm: LoadedModel,
    retain_prompts: list[str],
    retain_targets: list[str],
    forget_prompts: list[str],
    forget_targets: list[str],
    *,
    eval_pairs: ContrastPairs | None = None,
    num_masks: int = 1,
    num_updates: int = 500,
    batch_size: int = 64,
    lr: float = 0.1,
    lr_end: float = 0.01,
    l1_weight: float = 0.1,
    diff_clip: float = 5.0,
    seed: int | None = None,
    max_length: int | None = None,
    target_join: str = "space",
    checkpoint_above: int = DEFAULT_CHECKPOINT_ABOVE,
    progress: ProgressCallback = no_progress,
) -> AnalysisResult:
    """Fit ``num_masks`` contrastive gate sets; tensors ``masks.contrastive`` [num_masks,
    layers, heads], ``nll.retain`` and ``nll.forget`` [num_updates] (mean over sets).
    Batches of ``checkpoint_above`` tokens or more (padded) use gradient checkpointing."""
    check_counts(
        num_masks=(num_masks, 1),
        num_updates=(num_updates, 1),
        batch_size=(batch_size, 1),
        checkpoint_above=(checkpoint_above, 1),
    )
    for name, value in (("lr", lr), ("lr_end", lr_end), ("diff_clip", diff_clip)):
        if not value > 0:
            raise InvalidParameter(name, f"must be > 0, got {value}")
    if l1_weight < 0:
        raise InvalidParameter("l1_weight", f"must be ≥ 0, got {l1_weight}")
    train = ContrastPairs(retain_prompts, retain_targets, forget_prompts, forget_targets)
    retain, forget = train.encode(lm, max_length, "", target_join)
    evaluation = (
        eval_pairs.encode(lm, max_length, "eval_", target_join) if eval_pairs is not None else None
    )

    generator = make_generator(seed)
    init = uniform_gate_logits(num_masks, lm, generator).to(lm.device)
    fit = GateUpdates(init, lr, lr_end, num_updates, compute_dtype=lm.dtype)
    plan = plan_batches(len(retain), batch_size, num_updates, generator, lm.device)
    nll = torch.zeros(2, num_updates, device=lm.device)
    reporter = LaggedProgress(progress, STAGE, num_updates, lm.device)
    for update in range(num_updates):
        gates = fit.gates()
        lp_retain = score_targets(lm, plan.batch(retain, update), gates, checkpoint_above).logprob
        lp_forget = score_targets(lm, plan.batch(forget, update), gates, checkpoint_above).logprob
        push = (lp_forget - lp_retain.detach()).clamp(min=-diff_clip).mean(dim=1)
        task = -lp_retain.mean(dim=1) + push
        regulariser = -l1_weight * clamped_logit_mean(fit.logits)
        fit.backward(task.sum())
        fit.step(update, regulariser.sum())
        nll[0, update] = -lp_retain.detach().mean()
        nll[1, update] = -lp_forget.detach().mean()
        reporter.update(update + 1, (task.detach() + regulariser.detach()).mean())
    reporter.finish()

    masks = fit.logits.detach().sigmoid().float().cpu()
    eval_retain, eval_forget = evaluation if evaluation is not None else (retain, forget)
    summary = _evaluate(lm, masks, eval_retain, eval_forget, progress)
    nll = nll.cpu()
    summary |= {
        "evaluated_on": "eval" if evaluation is not None else "train",
        "num_pairs": len(eval_retain),
        "seed": generator.initial_seed(),
        "final_nll": {"retain": float(nll[0, -1]), "forget": float(nll[1, -1])},
    }
    return AnalysisResult(
        tensors={
            "masks.contrastive": masks.contiguous(),
            "nll.retain": nll[0].contiguous(),
            "nll.forget": nll[1].contiguous(),
        },
        summary=summary,
    )


def _evaluate(
    lm: LoadedModel,
    masks: torch.Tensor,
    retain: TargetBatch,
    forget: TargetBatch,
    progress: ProgressCallback,
) -> dict[str, object]:
    """Figures with all heads on, with each mask binarised and with each mask as fitted,
    from one pass per side."""
    n = masks.shape[0]
    binary = (masks >= BINARY_THRESHOLD).float()
    gates = torch.cat([torch.ones_like(masks[:1]), binary, masks]).to(lm.device)
    sides = {
        "retain": evaluate_gates(lm, retain, gates, _EVAL_BATCH, progress, EVAL_STAGE),
        "forget": evaluate_gates(lm, forget, gates, _EVAL_BATCH, progress, EVAL_STAGE),
    }
    per_set = [_figures(sides, s) for s in range(gates.shape[0])]
    gated, continuous = per_set[1 : n + 1], per_set[n + 1 :]
    return {
        "all_heads": per_set[0],
        "gated": [fig | {"heads_on": int(b.sum())} for fig, b in zip(gated, binary, strict=True)],
        "gated_mean": _mean(gated),
        "continuous": continuous,
        "continuous_mean": _mean(continuous),
    }


def _mean(figures: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(f[k] for f in figures) / len(figures) for k in figures[0]}


def _figures(sides: dict[str, TargetScores], gate_set: int) -> dict[str, float]:
    figures = {}
    for side, scores in sides.items():
        figures[f"{side}_accuracy"] = float(scores.correct[gate_set].float().mean())
        figures[f"{side}_token_accuracy"] = float(scores.token_accuracy[gate_set].mean())
        figures[f"{side}_logprob"] = float(scores.logprob[gate_set].mean())
    return figures
