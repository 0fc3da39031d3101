"""The CHG head taxonomy (Nam et al. 2025, Table 1) as pure rules on gate tensors.

G+ are the gates fitted under pressure to keep heads (λ > 0), G− under pressure to remove
them (λ < 0). A head the task needs survives removal pressure (G− high): facilitating. A
head that hurts the task is dropped even under keep pressure (G+ low): interfering. A head
that simply follows the pressure (G+ high, G− low) is irrelevant.

One meaning of ``threshold``, per mask, from the paper's scores: facilitation = G−,
interference = 1 − G+, irrelevance = G+ × (1 − G−); a head takes a role in a mask when
that role's score is ≥ threshold. Where scores overlap, the mask's role is resolved so
that each head has one role per mask: facilitating and interfering at once (G− high, G+
low: the two fits contradict each other) is ``inconsistent``; facilitating or interfering
wins over irrelevant (an overlap only thresholds at or below 0.5 allow); no role at all
(for example G+ = 0.6 and G− = 0.4 at threshold 0.5) is ``undetermined``, as is a role the
loss never supported (see ``workers.lens.chg``: the gate got there by noise).

The consensus role of a head is the one it takes in more than ``consensus`` (default half)
of the masks, else ``undetermined``: fits differ (the paper finds many overlapping sparse
sub-circuits), and a role one fit in three gives is not a finding. ``taxonomy_agreement``
is the share of masks whose role equals the consensus (for an undetermined head: the
share of masks in which it had no role).
"""

from __future__ import annotations

from enum import IntEnum

import torch

from workers.lens.errors import InvalidParameter


class HeadRole(IntEnum):
    """Role codes, as stored in the ``taxonomy`` and ``mask_roles`` tensors."""

    IRRELEVANT = 0
    FACILITATING = 1
    INTERFERING = 2
    INCONSISTENT = 3
    UNDETERMINED = 4

    @property
    def label(self) -> str:
        return self.name.lower()


KEEP_RULES = ("facilitating", "sufficient", "non_interfering", "remove_facilitating")
DEFAULT_CONSENSUS = 0.5


def check_consensus(consensus: float) -> None:
    """More than half, so that at most one role can reach it, and below 1 (all masks)."""
    if not 0.5 <= consensus < 1:
        raise InvalidParameter("consensus", f"must lie in [0.5, 1), got {consensus}")


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
    """In how many masks each role's score is ≥ ``threshold``: int64 [layers, heads] per
    role, the paper's counts (roles may overlap here; :func:`mask_roles` resolves them)."""
    return {role: (s >= threshold).sum(dim=0) for role, s in role_scores(g_plus, g_minus).items()}


def mask_roles(
    g_plus: torch.Tensor,
    g_minus: torch.Tensor,
    threshold: float,
    signal: torch.Tensor | None = None,
) -> torch.Tensor:
    """int8 [masks, layers, heads]: each head's ``HeadRole`` in each mask (see the module
    docstring). ``signal`` [masks, layers, heads] is the fit's ``gate_signal``: below 1,
    a facilitating, interfering or inconsistent role becomes undetermined."""
    scores = role_scores(g_plus.float(), g_minus.float())
    taken = {role: s >= threshold for role, s in scores.items()}
    roles = torch.full(g_plus.shape, int(HeadRole.UNDETERMINED), dtype=torch.int8)
    roles[taken[HeadRole.IRRELEVANT].cpu()] = HeadRole.IRRELEVANT
    roles[taken[HeadRole.INTERFERING].cpu()] = HeadRole.INTERFERING
    roles[taken[HeadRole.FACILITATING].cpu()] = HeadRole.FACILITATING
    both = taken[HeadRole.FACILITATING] & taken[HeadRole.INTERFERING]
    roles[both.cpu()] = HeadRole.INCONSISTENT
    if signal is not None:
        claimed = roles != HeadRole.IRRELEVANT
        roles[claimed & (signal.cpu() < 1)] = HeadRole.UNDETERMINED
    return roles


def consensus_roles(
    roles: torch.Tensor, consensus: float = DEFAULT_CONSENSUS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The consensus of per-mask ``roles`` [masks, layers, heads]: int8 [layers, heads]
    ``HeadRole`` codes and float32 [layers, heads] agreement (share of masks)."""
    masks = roles.shape[0]
    shares = torch.stack([(roles == role).sum(dim=0) for role in HeadRole]).float() / masks
    determined = shares[: HeadRole.UNDETERMINED]
    best, code = determined.max(dim=0)
    taxonomy = torch.where(best > consensus, code, int(HeadRole.UNDETERMINED)).to(torch.int8)
    agreement = shares.gather(0, taxonomy.long()[None])[0]
    return taxonomy, agreement


def heads_to_keep(
    masks_positive: torch.Tensor,
    masks_negative: torch.Tensor,
    keep: str,
    threshold: float,
    signal: torch.Tensor | None = None,
    consensus: float = DEFAULT_CONSENSUS,
) -> torch.Tensor:
    """float32 [layers, heads] head mask (1 on, 0 off) for an ablation from a chg result.

    ``facilitating``: only facilitating heads on. ``sufficient``: heads with mean G− ≥
    ``threshold`` on (the sub-circuit the removal fit kept). ``non_interfering``:
    interfering heads off. ``remove_facilitating``: facilitating heads off. Roles are the
    consensus of :func:`mask_roles` (``signal``: the chg result's ``gate_signal``).
    """
    if keep not in KEEP_RULES:
        raise InvalidParameter("keep", f"must be one of {list(KEEP_RULES)}, got {keep!r}")
    check_consensus(consensus)
    per_mask = mask_roles(masks_positive, masks_negative, threshold, signal)
    roles, _ = consensus_roles(per_mask, consensus)
    if keep == "facilitating":
        on = roles == HeadRole.FACILITATING
    elif keep == "sufficient":
        on = masks_negative.float().mean(dim=0).cpu() >= threshold
    elif keep == "non_interfering":
        on = roles != HeadRole.INTERFERING
    else:
        on = roles != HeadRole.FACILITATING
    return on.to(torch.float32).cpu()
