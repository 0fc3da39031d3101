"""The CHG head taxonomy (Nam et al. 2025, Table 1) as pure rules on gate tensors.

G+ are the gates fitted under pressure to keep heads (λ > 0), G− under pressure to remove
them (λ < 0). A head the task needs survives removal pressure (G− high): facilitating. A
head that hurts the task is dropped even under keep pressure (G+ low): interfering. A head
that simply follows the pressure (G+ high, G− low) is irrelevant. G+ low with G− high
contradicts both fits and is reported as inconsistent.
"""

from __future__ import annotations

from enum import IntEnum

import torch

from workers.lens.errors import InvalidParameter


class HeadRole(IntEnum):
    """Consensus role codes, as stored in the ``taxonomy`` tensor."""

    IRRELEVANT = 0
    FACILITATING = 1
    INTERFERING = 2
    INCONSISTENT = 3

    @property
    def label(self) -> str:
        return self.name.lower()


SCORED_ROLES = (HeadRole.FACILITATING, HeadRole.INTERFERING, HeadRole.IRRELEVANT)
"""Roles with a per-mask score; inconsistency exists only in the consensus view."""

KEEP_RULES = ("facilitating", "sufficient", "non_interfering", "remove_facilitating")


def role_scores(g_plus: torch.Tensor, g_minus: torch.Tensor) -> dict[HeadRole, torch.Tensor]:
    """Per-mask scores, each the shape of the gates ([masks, layers, heads]).

    facilitation = G−, interference = 1 − G+, irrelevance = G+ × (1 − G−).
    """
    return {
        HeadRole.FACILITATING: g_minus,
        HeadRole.INTERFERING: 1 - g_plus,
        HeadRole.IRRELEVANT: g_plus * (1 - g_minus),
    }


def mask_role_counts(
    g_plus: torch.Tensor, g_minus: torch.Tensor, threshold: float
) -> dict[HeadRole, torch.Tensor]:
    """In how many masks each head takes each role: int64 [layers, heads] per role.

    A head takes a role in a mask when that role's score is ≥ ``threshold``; roles are
    not exclusive (with threshold 0.5 a head can be both interfering and facilitating).
    """
    return {role: (s >= threshold).sum(dim=0) for role, s in role_scores(g_plus, g_minus).items()}


def consensus_roles(g_plus: torch.Tensor, g_minus: torch.Tensor, threshold: float) -> torch.Tensor:
    """int8 [layers, heads] ``HeadRole`` codes from the mask-averaged gates.

    ``g_plus`` and ``g_minus`` are [masks, layers, heads].
    """
    keep = g_plus.float().mean(dim=0) >= threshold
    needed = g_minus.float().mean(dim=0) >= threshold
    roles = torch.full(keep.shape, int(HeadRole.INTERFERING), dtype=torch.int8, device=keep.device)
    roles[keep & needed] = HeadRole.FACILITATING
    roles[keep & ~needed] = HeadRole.IRRELEVANT
    roles[~keep & needed] = HeadRole.INCONSISTENT
    return roles


def heads_to_keep(
    masks_positive: torch.Tensor, masks_negative: torch.Tensor, keep: str, threshold: float
) -> torch.Tensor:
    """float32 [layers, heads] head mask (1 on, 0 off) for an ablation from a chg result.

    ``facilitating``: only facilitating heads on. ``sufficient``: heads with mean G− ≥
    ``threshold`` on (the sub-circuit the removal fit kept). ``non_interfering``:
    interfering heads off. ``remove_facilitating``: facilitating heads off.
    """
    if keep not in KEEP_RULES:
        raise InvalidParameter("keep", f"must be one of {list(KEEP_RULES)}, got {keep!r}")
    roles = consensus_roles(masks_positive, masks_negative, threshold)
    if keep == "facilitating":
        on = roles == HeadRole.FACILITATING
    elif keep == "sufficient":
        on = masks_negative.float().mean(dim=0) >= threshold
    elif keep == "non_interfering":
        on = roles != HeadRole.INTERFERING
    else:
        on = roles != HeadRole.FACILITATING
    return on.to(torch.float32).cpu()
