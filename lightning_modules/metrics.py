"""Ranking metrics for location prediction, as a torchmetrics ``Metric``.

For each case the model returns a ranked list of location ids; with ``r`` the 0-based rank of
the true location in that list (absent: no credit):

* ``acc@k`` (= Hit@k, Recall@k with one relevant item): ``r < k``;
* ``ndcg@k``: ``1 / log2(r + 2)`` if ``r < k`` (one relevant item, so the ideal DCG is 1);
* ``mrr``: ``1 / (r + 1)`` over the returned list (0 when absent).

The sums are metric states with ``dist_reduce_fx="sum"``, so DDP ranks aggregate exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


class RankingMetrics(Metric):
    """Acc@k, NDCG@k and MRR of ranked predictions.

    Args:
        acc_at: The ``k`` of Acc@k.
        ndcg_at: The ``k`` of NDCG@k.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, acc_at: Sequence[int] = (1, 5, 10), ndcg_at: Sequence[int] = (5, 10)) -> None:
        super().__init__()
        self.acc_at = tuple(int(k) for k in acc_at)
        self.ndcg_at = tuple(int(k) for k in ndcg_at)
        for k in self.acc_at:
            self.add_state(f"hits_{k}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for k in self.ndcg_at:
            self.add_state(f"dcg_{k}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rr", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ranked: Tensor, target: Tensor) -> None:
        """Add cases.

        Args:
            ranked: ``(B, R)`` predicted location ids, best first (``-1`` = no prediction).
            target: ``(B,)`` true location ids.
        """
        if ranked.ndim != 2 or target.ndim != 1 or ranked.shape[0] != target.shape[0]:
            raise ValueError(f"ranked must be (B, R) and target (B,), got {tuple(ranked.shape)} and {tuple(target.shape)}")
        hit = ranked == target.unsqueeze(1)  # at most one True per row: predictions are distinct
        found = hit.any(1)
        rank = torch.where(found, hit.float().argmax(1), torch.full_like(target, ranked.shape[1])).double()
        for k in self.acc_at:
            setattr(self, f"hits_{k}", getattr(self, f"hits_{k}") + (found & (rank < k)).sum())
        gain = 1.0 / torch.log2(rank + 2.0)
        for k in self.ndcg_at:
            setattr(self, f"dcg_{k}", getattr(self, f"dcg_{k}") + torch.where(found & (rank < k), gain, 0.0).sum())
        self.rr += torch.where(found, 1.0 / (rank + 1.0), 0.0).sum()
        self.n += target.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """``{"acc@1": ..., "ndcg@5": ..., "mrr": ...}`` (NaN before any update)."""
        n = self.n.double() if self.n > 0 else torch.tensor(math.nan, dtype=torch.float64)
        out = {f"acc@{k}": getattr(self, f"hits_{k}") / n for k in self.acc_at}
        out.update({f"ndcg@{k}": getattr(self, f"dcg_{k}") / n for k in self.ndcg_at})
        out["mrr"] = self.rr / n
        return out


__all__ = ["RankingMetrics"]
