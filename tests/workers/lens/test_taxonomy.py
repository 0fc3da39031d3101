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
    role_scores,
)

# One layer, four heads, two masks whose means land in each quadrant (threshold 0.5):
#   head 0: G+ high, G- high -> facilitating     head 1: G+ high, G- low -> irrelevant
#   head 2: G+ low,  G- low  -> interfering      head 3: G+ low,  G- high -> inconsistent
G_PLUS = torch.tensor([[[0.9, 1.0, 0.1, 0.2]], [[0.7, 0.6, 0.3, 0.0]]])
G_MINUS = torch.tensor([[[0.8, 0.1, 0.0, 0.9]], [[1.0, 0.3, 0.2, 0.7]]])


def test_consensus_roles_cover_the_four_quadrants() -> None:
    roles = consensus_roles(G_PLUS, G_MINUS, 0.5)
    assert roles.dtype == torch.int8
    assert roles.tolist() == [
        [HeadRole.FACILITATING, HeadRole.IRRELEVANT, HeadRole.INTERFERING, HeadRole.INCONSISTENT]
    ]
    assert [int(r) for r in HeadRole] == [0, 1, 2, 3]
    assert HeadRole(2).label == "interfering"


def test_threshold_is_inclusive_and_uses_the_mask_average() -> None:
    g_plus = torch.tensor([[[0.5]], [[0.5]]])
    g_minus = torch.tensor([[[0.0]], [[1.0]]])  # mean 0.5: needed
    assert consensus_roles(g_plus, g_minus, 0.5).item() == HeadRole.FACILITATING
    assert consensus_roles(g_plus, g_minus, 0.6).item() == HeadRole.INTERFERING


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
    def keep(rule: str) -> list[float]:
        return heads_to_keep(G_PLUS, G_MINUS, rule, 0.5).tolist()[0]

    assert keep("facilitating") == [1, 0, 0, 0]
    assert keep("sufficient") == [1, 0, 0, 1]
    assert keep("non_interfering") == [1, 1, 0, 1]
    assert keep("remove_facilitating") == [0, 1, 1, 1]
    assert heads_to_keep(G_PLUS, G_MINUS, "sufficient", 0.5).dtype == torch.float32
    with pytest.raises(InvalidParameter) as err:
        heads_to_keep(G_PLUS, G_MINUS, "necessary", 0.5)
    assert err.value.field == "keep"
