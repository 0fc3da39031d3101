"""Ablation: target NLL and accuracy with all heads on versus with a head mask applied.

This is how a CHG claim is checked causally: zero the heads it calls facilitating and the
targets should get much harder; keep only those it calls sufficient and they should not.
Per example, NLL is the mean next-token NLL over its target tokens, and the example is
correct only when the argmax is right at every one of its target tokens. Summary figures
are means over examples.
"""

from __future__ import annotations

import torch

from workers.lens.errors import InvalidParameter
from workers.lens.gate_fit import check_counts, evaluate_gates
from workers.lens.loading import LoadedModel
from workers.lens.prompt_targets import encode_prompt_targets
from workers.lens.results import AnalysisResult, ProgressCallback, no_progress

STAGE = "ablate"


def check_head_mask(
    lm: LoadedModel, head_mask: torch.Tensor, field: str = "head_mask"
) -> torch.Tensor:
    """The mask as float32 [layers, heads] on the host, or an error naming ``field``."""
    expected = [lm.adapter.num_layers, lm.adapter.num_heads]
    if list(head_mask.shape) != expected:
        raise InvalidParameter(
            field, f"must be [layers, heads] = {expected}, got {list(head_mask.shape)}"
        )
    mask = head_mask.detach().float().cpu()
    if not bool(((mask >= 0) & (mask <= 1)).all()):
        raise InvalidParameter(field, "values must lie in [0, 1]")
    return mask


def ablate(
    lm: LoadedModel,
    prompts: list[str],
    targets: list[str],
    head_mask: torch.Tensor,
    *,
    max_length: int | None = None,
    target_join: str = "space",
    batch_size: int = 32,
    progress: ProgressCallback = no_progress,
) -> AnalysisResult:
    """Score the targets with all heads on and with ``head_mask`` [layers, heads] applied.

    Tensors: ``nll.baseline``, ``nll.masked``, ``accuracy.baseline``, ``accuracy.masked``
    [examples] float32 and ``head_mask`` [layers, heads]. Progress: stage ``ablate``, one
    report per chunk of ``batch_size`` examples (both conditions are scored together).
    """
    check_counts(batch_size=(batch_size, 1))
    mask = check_head_mask(lm, head_mask)
    data = encode_prompt_targets(
        lm.tokenizer,
        prompts,
        targets,
        lm.device,
        target_join=target_join,
        max_length=max_length,
        max_context=lm.max_context,
    )
    gates = torch.stack([torch.ones_like(mask), mask]).to(lm.device)
    scores = evaluate_gates(lm, data, gates, batch_size, progress, STAGE)
    nll = (-scores.logprob).float()
    accuracy = scores.correct.float()
    figures = {
        "nll": [float(v) for v in nll.mean(dim=1)],
        "accuracy": [float(v) for v in accuracy.mean(dim=1)],
    }
    summary: dict[str, float | int] = {"num_examples": len(data)}
    for name, (baseline, masked) in figures.items():
        summary |= {
            f"baseline_{name}": baseline,
            f"masked_{name}": masked,
            f"delta_{name}": masked - baseline,
        }
    summary |= {"heads_on": int((mask > 0).sum()), "heads_total": mask.numel()}
    return AnalysisResult(
        tensors={
            "nll.baseline": nll[0].contiguous(),
            "nll.masked": nll[1].contiguous(),
            "accuracy.baseline": accuracy[0].contiguous(),
            "accuracy.masked": accuracy[1].contiguous(),
            "head_mask": mask,
        },
        summary=summary,
    )
