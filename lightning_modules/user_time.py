"""``user_time``: the strongest simple count rule the suite knows, tuned on the valid split only.

A place ``c`` is scored for a case of user ``u`` whose target visit happens at hour ``t`` of the day:

    score(c) = H_h(c) + w_user · U(c) + w_traj · T_decay(c) + ε · popularity(c)

* ``H_h`` — the user's train visits to ``c`` whose hour of day is within ±``h`` hours of ``t``
  (circular: 23:00 is one hour from 00:00);
* ``U`` — the user's train visits to ``c`` at any hour;
* ``T_decay`` — occurrences of ``c`` among the visible visits before the target in the current
  trajectory, weighted ``decay^k`` for the visit ``k`` steps before the last one;
* popularity only breaks ties; the list is filled up with the most popular places.

Users repeat themselves by time of day (home in the evening, the office at 9), which the plain
user-frequency rule ignores: on the NYC release this rule is the bar the LLM has to clear.

``h``, ``w_user``, ``w_traj`` and ``decay`` are picked from a small grid on the **valid** split
(:func:`tune_user_time`); the test cases are never looked at. Scoring is vectorised over cases ×
candidates, so the whole grid costs seconds on NYC.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl

HOURS = 24
# The grid searched on the valid split (375 points).
GRID = {
    "hours": (1, 2, 3, 4, 6),
    "w_user": (0.05, 0.1, 0.25, 0.5, 1.0),
    "w_traj": (0.0, 0.5, 1.0, 2.0, 4.0),
    "decay": (0.5, 0.8, 1.0),
}


@dataclass(frozen=True)
class UserTimeParams:
    """Weights of :class:`UserTimeBaseline` (the hour-window term has weight 1)."""

    hours: int = 2
    w_user: float = 0.25
    w_traj: float = 1.0
    decay: float = 0.8


@dataclass
class _Features:
    """Per case, its candidate places (padded with -1) and their raw features."""

    cand: np.ndarray          # (n, C) location ids, -1 = padding
    hour_window: np.ndarray   # (n, C, max_h + 1): visits within ±h hours for h = 0..max_h
    user: np.ndarray          # (n, C) the user's train visits
    traj_pos: np.ndarray      # (n, C, K): 1 where the k-th most recent context visit is the candidate
    pop: np.ndarray           # (n, C) popularity in (0, 1], 0 for padding


class UserTimeBaseline:
    """Fits the per-user hour-of-day histograms on train check-ins and ranks cases.

    Args:
        train: Train check-ins (``user_id, loc_id, local_time``).
        size: Length of every ranked list.
        max_candidates: The user's most visited places kept as candidates (plus the trajectory's).
    """

    def __init__(self, train: pl.DataFrame, size: int = 10, max_candidates: int = 200) -> None:
        self.size = size
        self.max_candidates = max_candidates
        pop = train.group_by("loc_id").len().sort(["len", "loc_id"], descending=[True, False])
        self.popular = pop["loc_id"].to_numpy()
        self.pop_score = dict(zip(pop["loc_id"].to_list(), (pop["len"] / pop["len"].max()).to_list()))
        per = (
            train.select("user_id", "loc_id", hour=pl.col("local_time").dt.hour().cast(pl.Int64))
            .group_by("user_id", "loc_id", "hour").len()
        )
        self.hist: dict[object, tuple[np.ndarray, np.ndarray]] = {}
        for user, df in per.partition_by("user_id", as_dict=True).items():
            locs, inv = np.unique(df["loc_id"].to_numpy(), return_inverse=True)
            h = np.zeros((len(locs), HOURS))
            np.add.at(h, (inv, df["hour"].to_numpy()), df["len"].to_numpy())
            order = np.lexsort((locs, -h.sum(1)))[: max_candidates]
            self.hist[user[0]] = (locs[order], h[order])

    def _features(self, cases: pl.DataFrame, max_h: int) -> _Features:
        rows = cases.select("user_id", "target_hour", "context").iter_rows()
        per_case = []
        for user, hour, context in rows:
            locs, h = self.hist.get(user, (np.empty(0, np.int64), np.zeros((0, HOURS))))
            ctx = [int(x) for x in (context or []) if x is not None]
            extra = [c for c in dict.fromkeys(reversed(ctx)) if c not in set(locs.tolist())]
            cand = np.concatenate([locs, np.asarray(extra, dtype=np.int64)])
            hist = np.vstack([h, np.zeros((len(extra), HOURS))])
            # Visits within ±k hours of the target hour, for k = 0..max_h (circular day).
            rolled = np.roll(hist, HOURS // 2 - int(hour if hour is not None else 0), axis=1)
            mid = HOURS // 2
            window = np.stack([rolled[:, mid - k : mid + k + 1].sum(1) for k in range(max_h + 1)], axis=1)
            recent = ctx[::-1]  # most recent first
            pos = (cand[:, None] == np.asarray(recent, dtype=np.int64)[None, :]).astype(float) if recent else np.zeros((len(cand), 0))
            per_case.append((cand, window, hist.sum(1), pos))
        width = max([len(c) for c, *_ in per_case] + [1])
        depth = max([p.shape[1] for *_, p in per_case] + [1])
        n = len(per_case)
        cand = np.full((n, width), -1, dtype=np.int64)
        window = np.zeros((n, width, max_h + 1))
        user = np.zeros((n, width))
        pop = np.zeros((n, width))
        traj = np.zeros((n, width, depth), dtype=np.float32)
        for i, (c, w, u, p) in enumerate(per_case):
            k = len(c)
            cand[i, :k], window[i, :k], user[i, :k] = c, w, u
            pop[i, :k] = [self.pop_score.get(int(x), 0.0) for x in c]
            traj[i, :k, : p.shape[1]] = p
        return _Features(cand, window, user, traj, pop)

    @staticmethod
    def _score(f: _Features, p: UserTimeParams) -> np.ndarray:
        """``(n, C)`` scores of the candidates; -inf for padding and for places none of the terms supports."""
        t = f.traj_pos @ (p.decay ** np.arange(f.traj_pos.shape[2])).astype(np.float32)
        score = f.hour_window[:, :, p.hours] + p.w_user * f.user + p.w_traj * t + 1e-6 * f.pop
        return np.where((f.cand >= 0) & (score > 1e-5), score, -np.inf)

    def _rank_features(self, f: _Features, p: UserTimeParams) -> np.ndarray:
        score = self._score(f, p)
        k = min(self.size, score.shape[1])
        # The k best per row (argpartition), then sorted by score; popularity breaks most ties.
        part = np.argpartition(-score, k - 1, axis=1)[:, :k] if k < score.shape[1] else np.tile(np.arange(k), (len(score), 1))
        part = np.sort(part, axis=1)
        top = np.take_along_axis(part, np.argsort(-np.take_along_axis(score, part, 1), axis=1, kind="stable"), 1)
        picked = np.take_along_axis(f.cand, top, 1)
        ok = np.take_along_axis(score, top, 1) > -np.inf
        out = np.full((len(picked), self.size), -1, dtype=np.int64)
        if k == self.size:
            full = ok.all(1)
            out[full] = picked[full]
        else:
            full = np.zeros(len(picked), dtype=bool)
        fill = self.popular[: self.size * 3]
        for i in np.flatnonzero(~full):
            row = picked[i][ok[i]].tolist()
            seen = set(row)
            row += [int(x) for x in fill if int(x) not in seen][: self.size - len(row)]
            out[i, : len(row)] = row[: self.size]
        return out

    def rank(self, cases: pl.DataFrame, params: UserTimeParams) -> np.ndarray:
        """``(n_cases, size)`` ranked location ids (cases need ``user_id, target_hour, context``)."""
        return self._rank_features(self._features(cases, params.hours), params)

    def scores(self, cases: pl.DataFrame, params: UserTimeParams) -> tuple[np.ndarray, np.ndarray]:
        """Every candidate of each case with its score: ``(cand, score)``, both ``(n_cases, C)``; ``cand`` is -1
        and ``score`` -inf where a row has fewer candidates (the popularity fill of :meth:`rank` is not here)."""
        f = self._features(cases, params.hours)
        return f.cand, self._score(f, params)


def tune_user_time(model: UserTimeBaseline, valid_cases: pl.DataFrame) -> tuple[UserTimeParams, dict[str, float]]:
    """Pick the grid point with the best Acc@1 + NDCG@5 on ``valid_cases`` (ties: the earlier point).

    Returns:
        The chosen parameters and their valid-split figures (``acc@1``, ``ndcg@5``, ``cases``).
    """
    if valid_cases.is_empty():
        return UserTimeParams(), {"cases": 0}
    f = model._features(valid_cases, max(GRID["hours"]))
    target = valid_cases["target_loc"].to_numpy()
    best, best_key, best_fig = UserTimeParams(), -1.0, {}
    for hours, w_user, w_traj, decay in itertools.product(*GRID.values()):
        p = UserTimeParams(hours, w_user, w_traj, decay)
        ranked = model._rank_features(f, p)
        hit = ranked == target[:, None]
        rank = np.where(hit.any(1), hit.argmax(1), ranked.shape[1])
        acc1 = float((rank == 0).mean())
        ndcg5 = float(np.where(rank < 5, 1.0 / np.log2(rank + 2.0), 0.0).mean())
        if acc1 + ndcg5 > best_key + 1e-12:
            best, best_key, best_fig = p, acc1 + ndcg5, {"acc@1": round(acc1, 6), "ndcg@5": round(ndcg5, 6)}
    return best, {**best_fig, "cases": int(valid_cases.height), "grid_points": int(np.prod([len(v) for v in GRID.values()]))}


def params_dict(p: UserTimeParams) -> dict[str, float]:
    """The parameters as a plain dict (results files)."""
    return asdict(p)


__all__ = ["GRID", "UserTimeBaseline", "UserTimeParams", "params_dict", "tune_user_time"]
