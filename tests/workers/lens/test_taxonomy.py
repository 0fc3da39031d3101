"""The CHG taxonomy rules on hand-made gate values."""

from __future__ import annotations

import pytest
import torch

from workers.lens.errors import InvalidParameter
from workers.lens.taxonomy import (
    HeadRole,
    consensus_roles,
    heads_to_keep,
    mask_role_counts,
    mask_roles,
    role_scores,
)

F, IRR, INT, INC, UND = (
    HeadRole.FACILITATING,
    HeadRole.IRRELEVANT,
    HeadRole.INTERFERING,
    HeadRole.INCONSISTENT,
    HeadRole.UNDETERMINED,
)
# One layer, four heads, two masks (threshold 0.5):
#   head 0: facilitating in both     head 1: irrelevant in one, no role in the other
#   head 2: interfering in both      head 3: G+ low and G- high in both: inconsistent
G_PLUS = torch.tensor([[[0.9, 1.0, 0.1, 0.2]], [[0.7, 0.6, 0.3, 0.0]]])
G_MINUS = torch.tensor([[[0.8, 0.1, 0.0, 0.9]], [[1.0, 0.3, 0.2, 0.7]]])


def test_each_mask_gives_each_head_one_role() -> None:
    roles = mask_roles(G_PLUS, G_MINUS, 0.5)
    assert roles.dtype == torch.int8
    assert roles.tolist() == [[[F, IRR, INT, INC]], [[F, UND, INT, INC]]]
    assert [int(r) for r in HeadRole] == [0, 1, 2, 3, 4]
    assert HeadRole(4).label == "undetermined"


def test_consensus_needs_more_than_half_of_the_masks() -> None:
    taxonomy, agreement = consensus_roles(mask_roles(G_PLUS, G_MINUS, 0.5))
    assert taxonomy.dtype == torch.int8 and agreement.dtype == torch.float32
    assert taxonomy.tolist() == [[F, UND, INT, INC]]  # head 1: irrelevant in only half
    assert agreement.tolist() == [[1.0, 0.5, 1.0, 1.0]]
    three = torch.tensor([[[F]], [[F]], [[IRR]]], dtype=torch.int8)
    assert consensus_roles(three)[0].item() == F
    assert consensus_roles(three)[1].item() == pytest.approx(2 / 3)
    assert consensus_roles(three, 0.7)[0].item() == UND
    assert consensus_roles(three, 0.7)[1].item() == 0.0


def test_no_score_reaching_the_threshold_is_no_role() -> None:
    """G+ = 0.6 and G- = 0.4 in every mask: no score reaches 0.5 (irrelevance is 0.36)."""
    g_plus, g_minus = torch.full((3, 1, 1), 0.6), torch.full((3, 1, 1), 0.4)
    assert mask_roles(g_plus, g_minus, 0.5).flatten().tolist() == [UND] * 3
    assert consensus_roles(mask_roles(g_plus, g_minus, 0.5))[0].item() == UND
    # At 0.3 both facilitation (0.4) and interference (0.4) reach it: the fits contradict.
    assert mask_roles(g_plus, g_minus, 0.3).flatten().tolist() == [INC] * 3


def test_threshold_is_inclusive() -> None:
    g_plus, g_minus = torch.tensor([[[1.0]]]), torch.tensor([[[0.4]]])
    assert mask_roles(g_plus, g_minus, 0.4).item() == F  # irrelevance 0.6 too: F wins
    assert mask_roles(g_plus, g_minus, 0.6).item() == IRR


def test_a_role_without_loss_signal_is_undetermined() -> None:
    signal = torch.tensor([[[0.5, 0.5, 2.0, 0.9]], [[3.0, 0.1, 0.2, 0.0]]])
    roles = mask_roles(G_PLUS, G_MINUS, 0.5, signal)
    # Irrelevant needs no signal: it follows the pressure either way.
    assert roles.tolist() == [[[UND, IRR, INT, UND]], [[F, UND, UND, UND]]]


def test_scores_follow_the_paper() -> None:
    scores = role_scores(G_PLUS, G_MINUS)
    torch.testing.assert_close(scores[HeadRole.FACILITATING], G_MINUS)
    torch.testing.assert_close(scores[HeadRole.INTERFERING], 1 - G_PLUS)
    torch.testing.assert_close(scores[HeadRole.IRRELEVANT], G_PLUS * (1 - G_MINUS))


def test_per_mask_counts() -> None:
    counts = mask_role_counts(G_PLUS, G_MINUS, 0.5)
    # facilitation = G-: heads 0 (both), 3 (both)
    assert counts[HeadRole.FACILITATING].tolist() == [[2, 0, 0, 2]]
    # interference = 1 - G+: 0.1, 0.0, 0.9, 0.8 | 0.3, 0.4, 0.7, 1.0
    assert counts[HeadRole.INTERFERING].tolist() == [[0, 0, 2, 2]]
    # irrelevance = G+ (1 - G-): 0.18, 0.9, 0.1, 0.02 | 0.0, 0.42, 0.24, 0.0
    assert counts[HeadRole.IRRELEVANT].tolist() == [[0, 1, 0, 0]]


def test_keep_rules() -> None:
    def keep(rule: str, signal: torch.Tensor | None = None) -> list[float]:
        return heads_to_keep(G_PLUS, G_MINUS, rule, 0.5, signal).tolist()[0]

    assert keep("facilitating") == [1, 0, 0, 0]
    assert keep("sufficient") == [1, 0, 0, 1]
    assert keep("non_interfering") == [1, 1, 0, 1]
    assert keep("remove_facilitating") == [0, 1, 1, 1]
    quiet = torch.zeros(2, 1, 4)  # no head ever had a loss signal: nothing is removed
    assert keep("facilitating", quiet) == [0, 0, 0, 0]
    assert keep("non_interfering", quiet) == [1, 1, 1, 1]
    assert heads_to_keep(G_PLUS, G_MINUS, "sufficient", 0.5).dtype == torch.float32
    with pytest.raises(InvalidParameter) as err:
        heads_to_keep(G_PLUS, G_MINUS, "necessary", 0.5)
    assert err.value.field == "keep"
    with pytest.raises(InvalidParameter) as err:
        heads_to_keep(G_PLUS, G_MINUS, "facilitating", 0.5, consensus=0.4)
    assert err.value.field == "consensus"
