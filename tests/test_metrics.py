import math

import pytest
import torch

from m3bsr.metrics import metrics_from_ranks, rank_metrics, ranks


def test_all_scores_equal_gives_zero_hits():
    m = rank_metrics(torch.zeros(4, 100), torch.tensor([0, 5, 50, 99]))
    assert m["HR@10"] == 0.0 and m["NDCG@10"] == 0.0 and m["HR@20"] == 0.0
    assert m["MRR"] == pytest.approx(1 / 100)


def test_hand_computed_ranks_and_ndcg():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],    # target 0: rank 1
                           [0.9, 0.1, 0.5, 0.3],    # target 2: rank 2
                           [0.2, 0.2, 0.2, 0.1]])   # target 1 ties with two others: pessimistic rank 3
    t = torch.tensor([0, 2, 1])
    assert ranks(scores, t).tolist() == [1, 2, 3]
    m = rank_metrics(scores, t, ks=(1, 2))
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["HR@2"] == pytest.approx(2 / 3)
    assert m["NDCG@2"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_rank_at_boundary_k():
    s = torch.arange(20, 0, -1).float()[None]  # item i has rank i+1
    assert rank_metrics(s, torch.tensor([9]))["HR@10"] == 1.0
    assert rank_metrics(s, torch.tensor([10]))["HR@10"] == 0.0
    assert rank_metrics(s, torch.tensor([9]))["NDCG@10"] == pytest.approx(1 / math.log2(11))


def test_nan_scores_count_against_the_target():
    s = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 1.0, 2.0]])
    assert ranks(s, torch.tensor([0, 0])).tolist() == [2, 3]


def test_a_row_never_scored_is_an_error_not_a_hit():
    """Rank 0 (a row no batch scored) would count as a hit with NDCG = inf: refused."""
    with pytest.raises(ValueError, match="1-based"):
        metrics_from_ranks(torch.tensor([1, 0, 3]))
