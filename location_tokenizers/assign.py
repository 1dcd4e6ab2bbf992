"""Collision-free final codes: every location gets a full code no other location has.

Nearest-code quantisation can give two locations the same full code ``(c_1, ..., c_L)`` (for instance
two shops with the same description), and an LLM could then not tell them apart. :func:`assign_codes`
repairs this in three steps:

(a) **nearest** — each location's greedy nearest code per level (what the quantizer gives).
(b) **Sinkhorn** (the paper's repair) — locations that share a full code are re-assigned on the last
    level only, with a balanced Sinkhorn plan over the last-level codes of their prefix bucket,
    by their last-level residual distances. Codes held by non-colliding locations of the same
    ``(L-1)``-prefix are out of reach, so nobody else is disturbed. A small seeded jitter on the cost,
    growing with the round, breaks the ties between identical locations (identical rows of the cost
    would otherwise get identical argmaxes forever). Up to ``sinkhorn_rounds`` rounds; a location
    whose code is unique after a round keeps it.
(c) **exact fallback** — whatever still collides is solved exactly: per prefix bucket, an optimal
    assignment (:func:`scipy.optimize.linear_sum_assignment`) of the colliders to the bucket's free
    last-level codes by residual distance. When a bucket has more colliders than free codes (more
    than ``K`` locations share a prefix), the assignment keeps the cheapest ones and the rest move to
    the nearest prefix with room: first a sibling bucket (a different level ``L-2`` code, nearest by
    the level ``L-2`` residual distance), then, if the whole subtree is full, one level further up,
    and so on, descending greedily (nearest code whose subtree still has room) and taking the nearest
    free last-level code. This step cannot fail while ``N <= K**L``.

Guarantee on stability: a location whose step-(a) code is unique **always keeps it** — steps (b)
and (c) only ever change the codes of locations that collide, and they only hand out codes nobody
holds. Only colliders move, and only colliders of over-full buckets change prefix.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from location_tokenizers.quantizer import ResidualQuantizer

__all__ = ["assign_codes", "count_collisions"]


def count_collisions(codes: np.ndarray) -> int:
    """Number of locations beyond the first on each shared full code (``N - #distinct codes``).

    Args:
        codes: ``(N, L)`` integer codes.

    Returns:
        0 when every full code is unique.
    """
    if codes.shape[0] == 0:
        return 0
    return int(codes.shape[0] - np.unique(codes, axis=0).shape[0])


def _colliding(codes: np.ndarray) -> np.ndarray:
    """Boolean ``(N,)``: does the location share its full code with another one?"""
    if codes.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)] > 1


def _buckets(codes: np.ndarray, rows: np.ndarray) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Group ``rows`` by their ``(L-1)``-prefix, in sorted prefix order (deterministic)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in rows.tolist():
        groups.setdefault(tuple(codes[i, :-1].tolist()), []).append(i)
    return [(prefix, np.asarray(groups[prefix], dtype=np.int64)) for prefix in sorted(groups)]


def _batched_sinkhorn_argmax(costs: list[np.ndarray], epsilon: float, iters: int) -> list[np.ndarray]:
    """Row-wise argmax of the balanced Sinkhorn plan of many small cost matrices at once.

    Equivalent to ``sinkhorn(torch.from_numpy(c), epsilon, iters).argmax(1)`` for each ``c``
    (each is normalised to the range [0, 1] the same way), but problems of similar height are
    padded into one tensor so that thousands of tiny buckets cost a few tensor operations per
    iteration instead of thousands. Padding entries have zero kernel (``-inf`` in the log domain)
    and their potentials are pinned to 0 so they neither carry nor receive mass.

    Args:
        costs: Matrices ``(n_i, m_i)`` with ``n_i, m_i >= 1``.
        epsilon: Entropic regularisation relative to the normalised cost.
        iters: Sinkhorn iterations.

    Returns:
        One ``(n_i,)`` int64 array of column indices per problem, in input order.
    """
    out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(costs)
    # Group by the power of two above the height, so padding at most doubles the work.
    groups: dict[int, list[int]] = {}
    for j, c in enumerate(costs):
        groups.setdefault(int(np.ceil(np.log2(max(c.shape[0], 1)))), []).append(j)
    for _, index in sorted(groups.items()):
        rows = max(costs[j].shape[0] for j in index)
        cols = max(costs[j].shape[1] for j in index)
        cost = torch.zeros(len(index), rows, cols, dtype=torch.float64)
        row_ok = torch.zeros(len(index), rows, dtype=torch.bool)
        col_ok = torch.zeros(len(index), cols, dtype=torch.bool)
        for g, j in enumerate(index):
            c = torch.from_numpy(np.asarray(costs[j], dtype=np.float64))
            c = c - c.min()
            if c.max() > 0:
                c = c / c.max()
            n, m = c.shape
            cost[g, :n, :m] = c
            row_ok[g, :n] = True
            col_ok[g, :m] = True
        valid = row_ok[:, :, None] & col_ok[:, None, :]
        log_kernel = torch.where(valid, -cost / epsilon, torch.full_like(cost, -math.inf))
        log_a = -torch.log(row_ok.sum(1, keepdim=True).double())  # (G, 1): each row carries 1/n
        log_b = -torch.log(col_ok.sum(1, keepdim=True).double())  # (G, 1): each column gets 1/m
        u = torch.zeros(len(index), rows, dtype=torch.float64)
        v = torch.zeros(len(index), cols, dtype=torch.float64)
        for _ in range(iters):
            u = torch.where(row_ok, log_a - torch.logsumexp(log_kernel + v[:, None, :], dim=2), 0.0)
            v = torch.where(col_ok, log_b - torch.logsumexp(log_kernel + u[:, :, None], dim=1), 0.0)
        # Padded columns hold -inf, so the argmax never lands on one for a real row.
        choice = (log_kernel + u[:, :, None] + v[:, None, :]).argmax(2).numpy()
        for g, j in enumerate(index):
            out[j] = choice[g, : costs[j].shape[0]].astype(np.int64)
    return out


class _Occupancy:
    """Which full codes are taken, with counts per prefix of every length (for capacity checks)."""

    def __init__(self, num_levels: int, codebook_size: int) -> None:
        self.num_levels = num_levels
        self.codebook_size = codebook_size
        # prefix_count[d][p]: number of taken full codes starting with the length-d prefix p.
        self.prefix_count: list[dict[tuple[int, ...], int]] = [{} for _ in range(num_levels)]
        # last_held[p]: last-level codes taken under the (L-1)-prefix p.
        self.last_held: dict[tuple[int, ...], set[int]] = {}

    def add(self, code: tuple[int, ...]) -> None:
        """Mark a full code as taken (it must be free)."""
        held = self.last_held.setdefault(code[:-1], set())
        if code[-1] in held:
            raise RuntimeError(f"code {code} handed out twice (bug in the collision repair)")
        held.add(code[-1])
        for d in range(self.num_levels):
            counts = self.prefix_count[d]
            counts[code[:d]] = counts.get(code[:d], 0) + 1

    def has_room(self, prefix: tuple[int, ...]) -> bool:
        """Is some full code under ``prefix`` (of length ``d < L``) still free?"""
        capacity = self.codebook_size ** (self.num_levels - len(prefix))
        return self.prefix_count[len(prefix)].get(prefix, 0) < capacity

    def free_last(self, prefix: tuple[int, ...]) -> np.ndarray:
        """Free last-level codes under an ``(L-1)``-prefix, ascending."""
        held = self.last_held.get(prefix, set())
        return np.asarray([k for k in range(self.codebook_size) if k not in held], dtype=np.int64)


def _sq_dist(r: np.ndarray, book: np.ndarray) -> np.ndarray:
    """Squared distances ``(K,)`` from a residual ``(dim,)`` to a codebook ``(K, dim)``."""
    return ((book - r[None, :]) ** 2).sum(1)


def _relocate(
    i: int,
    codes: np.ndarray,
    residuals: np.ndarray,
    codebooks: np.ndarray,
    occupancy: _Occupancy,
) -> tuple[int, ...]:
    """Give location ``i`` (whose own bucket is full) the nearest free code in the nearest prefix with room.

    Keeps as long a prefix of its code as possible: the longest ``codes[i, :d]`` (``d <= L-2``)
    whose subtree has a free code, then descends from level ``d`` choosing at each level the
    nearest code (by the residual at that level) whose subtree still has room, and finally the
    nearest free last-level code.
    """
    num_levels = codes.shape[1]
    depth = 0
    for d in range(num_levels - 2, -1, -1):
        if occupancy.has_room(tuple(codes[i, :d].tolist())):
            depth = d
            break
    prefix = [int(c) for c in codes[i, :depth]]
    # The residual entering level ``depth`` is unchanged, since the codes before it are kept.
    residual = residuals[i, depth].copy()
    for level in range(depth, num_levels - 1):
        dist = _sq_dist(residual, codebooks[level])
        for k in np.argsort(dist, kind="stable").tolist():
            if occupancy.has_room((*prefix, k)):
                break
        else:  # pragma: no cover - the capacity check above makes this unreachable
            raise RuntimeError("no room below a prefix that reported room")
        prefix.append(k)
        residual = residual - codebooks[level, k]
    free = occupancy.free_last(tuple(prefix))
    last = int(free[np.argmin(_sq_dist(residual, codebooks[-1])[free])])
    return (*prefix, last)


def assign_codes(
    latents: Tensor,
    quantizer: ResidualQuantizer,
    sinkhorn_rounds: int = 20,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Unique full codes for all locations (nearest codes, Sinkhorn repair, exact fallback).

    See the module docstring for the three steps. Non-colliding locations of step (a) always keep
    their codes.

    Args:
        latents: ``(N, latent)`` encoder outputs, one row per location.
        quantizer: The trained residual quantizer (its codebooks and ``sinkhorn_epsilon`` are used).
        sinkhorn_rounds: Maximum rounds of the Sinkhorn repair (0 skips it).
        seed: Seed of the tie-breaking jitter in the Sinkhorn repair; the result is a deterministic
            function of the inputs and ``seed``.

    Returns:
        ``codes``: ``(N, L)`` int64 array, pairwise distinct rows, entries in ``[0, K)``; ``stats``:
        ``collisions_after_nearest``, ``collisions_after_sinkhorn``, ``collisions_final``
        (each ``N - #distinct codes``), ``colliding_after_nearest`` (locations sharing their code
        after step a), ``sinkhorn_rounds_used``, ``moved_by_sinkhorn`` (locations whose code step b
        changed), ``moved_by_fallback`` (locations whose code step c changed),
        ``moved_to_other_prefix`` (locations of over-full buckets relocated by step c),
        ``changed_total`` (locations whose final code differs from step a).

    Raises:
        ValueError: If ``N > K**L`` (not enough distinct codes for all locations).
    """
    num_levels, size = quantizer.num_levels, quantizer.codebook_size
    n = int(latents.shape[0])
    if n > size**num_levels:
        raise ValueError(
            f"cannot give {n} locations distinct codes: only K**L = {size}**{num_levels} = "
            f"{size**num_levels} full codes exist; enlarge the codebooks or add a level"
        )
    if latents.dim() != 2:
        raise ValueError(f"latents must be (N, latent), got shape {tuple(latents.shape)}")

    # (a) greedy nearest codes, with the residuals and distances the repair steps need.
    codes_t, residuals_t, dists_t = quantizer.greedy_path(latents)
    codes = codes_t.cpu().numpy().astype(np.int64)
    residuals = residuals_t.cpu().double().numpy()
    last_dist = dists_t[-1].cpu().double().numpy()
    codebooks = quantizer.codebooks.detach().cpu().double().numpy()
    nearest = codes.copy()
    stats: dict[str, Any] = {
        "collisions_after_nearest": count_collisions(codes),
        "colliding_after_nearest": int(_colliding(codes).sum()),
    }

    # (b) Sinkhorn repair of the last level, bucket by bucket (buckets batched for speed).
    rng = np.random.default_rng(seed)
    rounds_used = 0
    for round_index in range(sinkhorn_rounds):
        colliding = _colliding(codes)
        if not colliding.any():
            break
        rounds_used += 1
        held: dict[tuple[int, ...], set[int]] = {}
        for i in np.flatnonzero(~colliding).tolist():
            held.setdefault(tuple(codes[i, :-1].tolist()), set()).add(int(codes[i, -1]))
        problems: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for prefix, members in _buckets(codes, np.flatnonzero(colliding)):
            taken = held.get(prefix, set())
            free = np.asarray([k for k in range(size) if k not in taken], dtype=np.int64)
            cost = last_dist[np.ix_(members, free)]
            span = cost.max() - cost.min()
            cost = (cost - cost.min()) / span if span > 0 else np.zeros_like(cost)
            # Jitter relative to the normalised cost: about epsilon in round 0 (enough to split
            # identical rows without overriding real distance differences), larger in later rounds.
            cost = cost + quantizer.sinkhorn_epsilon * (round_index + 1) * rng.random(cost.shape)
            problems.append((members, free, cost))
        choices = _batched_sinkhorn_argmax(
            [cost for _, _, cost in problems], quantizer.sinkhorn_epsilon, quantizer.sinkhorn_iters
        )
        for (members, free, _), choice in zip(problems, choices):
            codes[members, -1] = free[choice]
    after_sinkhorn = codes.copy()
    stats["sinkhorn_rounds_used"] = rounds_used
    stats["collisions_after_sinkhorn"] = count_collisions(codes)
    stats["moved_by_sinkhorn"] = int((after_sinkhorn != nearest).any(1).sum())

    # (c) exact fallback: optimal assignment to free codes per bucket, overflow to nearby prefixes.
    colliding = _colliding(codes)
    moved_prefix = 0
    if colliding.any():
        occupancy = _Occupancy(num_levels, size)
        for i in np.flatnonzero(~colliding).tolist():
            occupancy.add(tuple(codes[i].tolist()))
        overflow: list[int] = []
        # All in-bucket assignments first, so relocated locations never take a code a collider of
        # its own bucket could have had.
        for prefix, members in _buckets(codes, np.flatnonzero(colliding)):
            free = occupancy.free_last(prefix)
            if free.size:
                rows, cols = linear_sum_assignment(last_dist[np.ix_(members, free)])
            else:
                rows, cols = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
            for r, c in zip(rows.tolist(), cols.tolist()):
                codes[members[r], -1] = free[c]
                occupancy.add(tuple(codes[members[r]].tolist()))
            assigned = np.zeros(len(members), dtype=bool)
            assigned[rows] = True
            overflow.extend(members[~assigned].tolist())
        for i in sorted(overflow):
            code = _relocate(i, codes, residuals, codebooks, occupancy)
            codes[i] = code
            occupancy.add(code)
            moved_prefix += 1
    stats["moved_by_fallback"] = int((codes != after_sinkhorn).any(1).sum())
    stats["moved_to_other_prefix"] = moved_prefix
    stats["changed_total"] = int((codes != nearest).any(1).sum())
    stats["collisions_final"] = count_collisions(codes)
    if stats["collisions_final"]:  # pragma: no cover - guaranteed by construction
        raise RuntimeError(f"collision repair left {stats['collisions_final']} collisions (bug)")
    return codes, stats

