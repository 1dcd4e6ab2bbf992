"""Ranking metrics for location prediction, as a torchmetrics ``Metric``.

For each case the model returns a ranked list of location ids; with ``r`` the 0-based rank of
the true location in that list (absent: no credit):

* ``acc@k`` (= Hit@k, Recall@k with one relevant item): ``r < k``;
* ``ndcg@k``: ``1 / log2(r + 2)`` if ``r < k`` (one relevant item, so the ideal DCG is 1);
* ``mrr``: ``1 / (r + 1)`` over the returned list (0 when absent).

The sums are metric states with ``dist_reduce_fx="sum"``, so DDP ranks aggregate exactly.

:func:`per_case` gives the same figures case by case, and :func:`paired_bootstrap` turns them into
95 % intervals: every model is resampled on the *same* draws of cases, so the interval of a
difference between two models is that of a paired comparison (400 cases give Acc@1 a standard error
of about 0.02; a 0.03 gap can be noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
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


def per_case(ranked: np.ndarray, target: np.ndarray, acc_at: Sequence[int] = (1, 5, 10),
             ndcg_at: Sequence[int] = (5, 10)) -> dict[str, np.ndarray]:
    """Each case's Acc@k, NDCG@k and reciprocal rank (their means are :class:`RankingMetrics`)."""
    ranked, target = np.asarray(ranked), np.asarray(target)
    hit = ranked == target[:, None]
    found = hit.any(1)
    rank = np.where(found, hit.argmax(1), ranked.shape[1]).astype(np.float64)
    out = {f"acc@{k}": (found & (rank < k)).astype(np.float64) for k in acc_at}
    gain = 1.0 / np.log2(rank + 2.0)
    out.update({f"ndcg@{k}": np.where(found & (rank < k), gain, 0.0) for k in ndcg_at})
    out["mrr"] = np.where(found, 1.0 / (rank + 1.0), 0.0)
    return out


def paired_bootstrap(
    values: dict[str, dict[str, np.ndarray]], reference: str | None = None, diff_metrics: Sequence[str] = ("acc@1", "ndcg@5"),
    resamples: int = 1000, seed: int = 0, level: float = 0.95,
) -> dict[str, dict]:
    """Seeded paired bootstrap intervals of every metric of every model, and of ``reference`` − each other model.

    Args:
        values: ``{model: {metric: per-case values}}``, all on the same cases in the same order.
        reference: The model compared with the others (None: no differences).
        diff_metrics: Metrics whose differences get intervals.
        resamples: Bootstrap draws (each draws n cases with replacement, shared by all models).
        seed: Seed of the draws.
        level: Coverage of the percentile intervals.

    Returns:
        ``{"intervals": {model: {metric: [lo, hi]}}, "differences": {other: {metric: {"diff", "ci",
        "above_zero"}}}, "resamples", "level", "seed"}``.
    """
    models = list(values)
    n = len(next(iter(next(iter(values.values())).values()))) if models else 0
    out: dict[str, dict] = {"intervals": {}, "differences": {}, "resamples": int(resamples), "level": level, "seed": int(seed)}
    if n == 0:
        return out
    rng = np.random.default_rng(seed)
    # counts[b, i]: how often case i is drawn in resample b; a resample's mean is counts @ v / n.
    counts = np.zeros((resamples, n), dtype=np.float64)
    for b in range(resamples):
        counts[b] = np.bincount(rng.integers(0, n, size=n), minlength=n)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]

    def interval(v: np.ndarray) -> list[float]:
        lo, hi = np.percentile(counts @ v / n, q)
        return [round(float(lo), 6), round(float(hi), 6)]

    for model in models:
        out["intervals"][model] = {m: interval(v) for m, v in values[model].items()}
    if reference is not None and reference in values:
        for other in models:
            if other == reference:
                continue
            diffs = {}
            for m in diff_metrics:
                d = values[reference][m] - values[other][m]
                ci = interval(d)
                diffs[m] = {"diff": round(float(d.mean()), 6), "ci": ci, "above_zero": ci[0] > 0}
            out["differences"][other] = diffs
    return out


__all__ = ["RankingMetrics", "paired_bootstrap", "per_case"]
