"""Full-ranking metrics with pessimistic ties (``docs/protocol.md``).

rank = 1 + number of *other* items whose score is >= the target's score. A model that gives
every item the same score therefore ranks the target last and gets HR@K = 0.
"""
from __future__ import annotations

import torch

KS = (5, 10, 20)


def ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pessimistic 1-based rank of each target. scores ``(B, N)``, target ``(B,)`` -> ``(B,)`` long.

    NaN scores count against the target: a NaN elsewhere ties above it, a NaN target ranks last.
    """
    scores = scores.float()
    t = scores.gather(1, target[:, None])
    r = ((scores >= t) | scores.isnan()).sum(1)  # the target counts itself: 1 + the others at or above it
    return torch.where(t[:, 0].isnan(), torch.full_like(r, scores.shape[1]), r)


def ndcg_per_row(r: torch.Tensor, k: int) -> torch.Tensor:
    """NDCG@k of each row from its 1-based target rank ``(n,)``: one relevant item, so 1/log2(rank+1)
    when rank <= k, else 0."""
    r = r.double()
    return torch.where(r <= k, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r))


def metrics_from_ranks(r: torch.Tensor, ks=KS) -> dict[str, float]:
    """HR@K, NDCG@K (:func:`ndcg_per_row`) and MRR, averaged over rows; ranks are 1-based."""
    if len(r) and int(r.min()) < 1:
        raise ValueError(f"ranks are 1-based, got {int(r.min())} (a row that was never scored?)")
    r = r.double()
    out = {}
    for k in ks:
        out[f"HR@{k}"] = (r <= k).double().mean().item()
        out[f"NDCG@{k}"] = ndcg_per_row(r, k).mean().item()
    out["MRR"] = (1.0 / r).mean().item()
    return out


def rank_metrics(scores: torch.Tensor, target: torch.Tensor, ks=KS) -> dict[str, float]:
    """Full-ranking metrics. scores ``(B, N)``, target ``(B,)`` item indices in 0..N-1.

    >>> rank_metrics(torch.zeros(2, 30), torch.tensor([3, 7]))["HR@10"]
    0.0
    """
    return metrics_from_ranks(ranks(scores, target), ks)
